"""`report`, `show`, the HTML report (checked in headless Chromium) and the
Parquet tables, on tiny runs made by the CLI in-process."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from gadiag_core.commands.main import main
from test_cli import TINY_CONFIG

CHROMIUM = Path("/usr/bin/chromium")

# A second task, so that `report` can combine runs of different tasks.
WORDS_PLUGIN = '''
from gadiag_core import hookimpl
from gadiag_tasks.synthetic_math import SyntheticMath


class Words(SyntheticMath):
    name = "words"


@hookimpl
def register_tasks(register):
    register("words", lambda options, run: Words(levels=["L4"]), "word problems only (test plugin)")
'''


def make_run(tmp: Path, model_dir: Path, name: str, extra: list[str] = ()) -> Path:
    config = tmp / f"{name}.toml"
    config.write_text(TINY_CONFIG)
    run_dir = tmp / name
    code = main(["--config", str(config), "--model", str(model_dir), "--run-dir", str(run_dir), "--threads", "1", *extra])
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """A finished tiny run of `math`, with its HTML report and Parquet tables."""
    tmp = tmp_path_factory.mktemp("report")
    run_dir = make_run(tmp, tiny_model_dir, "math-run")
    assert main(["report", str(run_dir), "--html", "--parquet"]) == 0
    return run_dir


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------
# report


def test_report_reprints_the_leaderboard(tiny_run, capsys):
    code, out, err = run_cli(capsys, "report", str(tiny_run))
    assert code == 0, err
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert f"task math v{summary['task_version']}" in out
    for name in ("other_solution", "reverse_kl", "sampled_token", "rl_outcome", "noise_ceiling"):
        assert name in out


def test_report_combines_runs_of_two_tasks(tiny_run, tiny_model_dir, tmp_path, capsys):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "words_task.py").write_text(WORDS_PLUGIN)
    words_run = make_run(tmp_path, tiny_model_dir, "words-run", ["--task", "words", "--plugins-dir", str(plugins)])
    capsys.readouterr()

    code, out, err = run_cli(capsys, "report", str(tiny_run), str(words_run))
    assert code == 0, err
    # One table: a single title, a column group headed by each task.
    assert out.count("gradient alignment") == 1
    assert "math v" in out and "words v" in out
    header = next(line for line in out.splitlines() if "math v" in line)
    assert "words v" in header, "the two runs' groups should sit side by side in one header"
    # A row carries the numbers of both runs.
    for run_dir in (tiny_run, words_run):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert str(run_dir) in out
        nodes = summary["rows"]["rl_outcome"]["nodes"]
        assert nodes >= 0
    line = next(line for line in out.splitlines() if "rl_outcome" in line)
    assert len(re.findall(r"[+-]\d\.\d{3}|–|·", line)) >= 6


def test_report_bad_input_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", str(tmp_path / "missing"))
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert code == 2 and "not a run directory" in err


# ----------------------------------------------------------------------------
# show


def test_show_colours_a_rollout_and_lists_candidates(tiny_run, capsys):
    code, out, err = run_cli(capsys, "show", str(tiny_run), "--question", "0", "--teacher", "solution")
    assert code == 0, err
    rollouts = read_jsonl(tiny_run / "rollouts.jsonl")
    first = rollouts[0]
    assert f"question {first['question']}" in out
    assert "solution/reverse_kl" in out  # the bare teacher name took the run's first objective
    assert "ideal's candidates" in out
    tokens = [r for r in read_jsonl(tiny_run / "tokens.jsonl") if r["question"] == first["question"]]
    assert tokens, "the tiny run scored no token of question 0"
    assert "Q̂" in out

    code, out, _ = run_cli(capsys, "show", str(tiny_run), "--question", first["question"], "--rollout", "1", "--teacher", "rl_outcome")
    assert code == 0 and "rollout 1" in out and "rollout 0 " not in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--question", "99"], "no question '99'"),
        (["--question", "0", "--teacher", "solutoin"], "Did you mean 'solution'?"),
        (["--question", "0", "--rollout", "7"], "has no rollout 7"),
        ([], "--question"),
    ],
)
def test_show_bad_input_is_one_line(tiny_run, capsys, argv, expected):
    code, _, err = run_cli(capsys, "show", str(tiny_run), *argv)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------
# Parquet


def test_parquet_reads_with_pandas_and_datasets(tiny_run, tmp_path, monkeypatch):
    import pandas as pd

    tokens = read_jsonl(tiny_run / "tokens.jsonl")
    frame = pd.read_parquet(tiny_run / "tokens.parquet")
    assert len(frame) == len(tokens)
    for row, value in tokens[0]["cos"].items():
        column = frame[f"cos.{row}"]
        assert column.dtype == "float64"
        assert (value is None and pd.isna(column.iloc[0])) or column.iloc[0] == pytest.approx(value)
    assert list(frame["candidates"].iloc[0]) == tokens[0]["candidates"]
    if "teacher_top" in tokens[0]:
        teacher, top = next(iter(tokens[0]["teacher_top"].items()))
        assert frame[f"teacher_top.{teacher}"].iloc[0][0]["token"] == top[0][0]
    assert len(pd.read_parquet(tiny_run / "rollouts.parquet")) == len(read_jsonl(tiny_run / "rollouts.jsonl"))
    questions = pd.read_parquet(tiny_run / "questions.parquet")
    assert "question_cos.rl_outcome" in questions.columns

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    dataset = datasets.load_dataset("parquet", data_files=str(tiny_run / "tokens.parquet"), cache_dir=str(tmp_path / "hf-cache"))["train"]
    assert dataset.num_rows == len(tokens)
    assert dataset[0]["node"] == tokens[0]["node"]


# ----------------------------------------------------------------------------
# HTML report: files


def test_html_report_files_are_self_contained(tiny_run):
    report = tiny_run / "report"
    pages = sorted(report.glob("*.html"))
    questions = {r["question"] for r in read_jsonl(tiny_run / "rollouts.jsonl")}
    assert (report / "index.html") in pages
    assert len(pages) == 1 + len(questions)
    for name in ("alignment_by_position.png", "alignment_distribution.png", "correct_vs_incorrect.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for page in pages:
        text = page.read_text()
        # Nothing fetched from elsewhere: no remote URL in any src/href/url()/import.
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I), page.name
        assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//|@import", text, re.I), page.name
        for target in re.findall(r"""(?:src|href)="([^"#?]+)""", text):
            if not target.startswith("data:"):
                assert (report / target).exists(), f"{page.name} links to missing {target}"


def test_html_report_tolerates_older_records(tiny_run, tmp_path, capsys):
    """Runs without per-token strings, teachers' top tokens or summary.json
    (interrupted) still report."""
    from gadiag_core.reports.html_report import write_html_report

    run = tmp_path / "old-run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("report", "*.parquet"))
    rollouts = read_jsonl(run / "rollouts.jsonl")
    for r in rollouts:
        r.pop("tokens", None)
    (run / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rollouts))
    tokens = read_jsonl(run / "tokens.jsonl")
    for r in tokens:
        r.pop("teacher_top", None)
    (run / "tokens.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tokens))
    (run / "summary.json").unlink()

    index = write_html_report(run)
    assert "Unfinished run" in index.read_text()
    page = next((run / "report").glob("question-*.html")).read_text()
    assert "did not record per-token strings" in page
    code, out, err = run_cli(capsys, "report", str(run))
    assert code == 0 and "unfinished" in err and "rl_outcome" in out
    code, out, _ = run_cli(capsys, "show", str(run), "--question", "0")
    assert code == 0 and "not recorded" in out


# ----------------------------------------------------------------------------
# HTML report in headless Chromium


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe
    (--remote-debugging-pipe: commands on fd 3, replies on fd 4, NUL-separated JSON)."""

    def __init__(self, width: int = 1200, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="gadiag-chromium-")

        def high(fd):  # keep clear of fds 3 and 4, which the child's ends go to
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(fd)
            return moved

        child_in, self._send = (high(fd) for fd in os.pipe())
        self._recv, child_out = (high(fd) for fd in os.pipe())

        def wire():
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.proc = subprocess.Popen(
            [
                str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "--remote-debugging-pipe", "about:blank",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, pass_fds=(3, 4),
        )
        os.close(child_in)
        os.close(child_out)
        self._buffer, self._id, self.events = b"", 0, []
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", page=True)

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self._recv], [], [], left)[0]:
                chunk = os.read(self._recv, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, page: bool = False, timeout: float = 60, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if page:
            message["sessionId"] = self.session
        os.write(self._send, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def open(self, url: str, timeout: float = 60) -> None:
        self.events.clear()
        self.call("Page.navigate", page=True, url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._message(deadline))
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", page=True, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", page=True, format="png")["data"])

    def hover(self, x: float, y: float) -> None:
        self.call("Input.dispatchMouseEvent", page=True, type="mouseMoved", x=x, y=y)

    def console_errors(self) -> list[str]:
        """Uncaught exceptions, console.error/warn/assert, and browser log errors
        (failed loads) since the page was opened."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
                errors.append(params["entry"].get("text", ""))
        return errors

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._send)
        os.close(self._recv)
        shutil.rmtree(self.profile, ignore_errors=True)


def assert_not_blank(png: bytes, name: str) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    pixels = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, name
    inked = (np.abs(pixels - pixels[0, 0]).sum(-1) > 0.1).mean()
    assert pixels.std() > 0.02 and inked > 0.01, f"{name} screenshot looks blank (std {pixels.std():.3f}, inked {inked:.3%})"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("headless Chromium not installed (/usr/bin/chromium; Debian package `chromium`)")
    chromium = Chromium()
    yield chromium
    chromium.close()


def test_browser_catches_console_errors(browser, tmp_path):
    """The check below would see a broken page: a thrown error and a missing image."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><p>x</p><img src='missing.png'><script>console.error('boom'); nope();</script>")
    browser.open(page.as_uri())
    errors = " | ".join(browser.console_errors())
    assert "boom" in errors and "nope" in errors


def test_html_report_renders_in_chromium(tiny_run, browser, tmp_path):
    report = tiny_run / "report"
    browser.open((report / "index.html").as_uri())
    assert browser.console_errors() == []
    png = browser.screenshot()
    (tmp_path / "index.png").write_bytes(png)
    assert_not_blank(png, "index.html")
    assert browser.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert browser.evaluate("document.images.length") == 3
    assert browser.evaluate("document.querySelectorAll('table.leaderboard tbody tr').length") >= 2

    for page in sorted(report.glob("question-*.html")):
        browser.open(page.as_uri())
        assert browser.console_errors() == [], page.name
        png = browser.screenshot()
        assert_not_blank(png, page.name)
        scored = browser.evaluate("document.querySelectorAll('.tok.s').length")
        if not scored:
            continue
        # Hover over a scored token: its details appear.
        x, y = browser.evaluate(
            "(() => { const e = document.querySelector('.tok.s'); e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        browser.hover(x, y)
        assert browser.evaluate("!document.getElementById('tip').hidden")
        tip = browser.evaluate("document.getElementById('tip').textContent")
        assert "ideal's candidates" in tip and "Q̂" in tip and "π(token)" in tip
        # Another row recolours the text without errors.
        browser.evaluate(
            "(() => { const s = document.getElementById('row'); s.value = 'rl_outcome';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        assert browser.console_errors() == [], page.name
        (tmp_path / f"{page.stem}.png").write_bytes(browser.screenshot())
