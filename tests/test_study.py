"""`gadiag-harness study`: the matrix report on hand-made summaries, the study
file's grid, and a study of two tiny cells that resumes after a kill to
identical files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from gadiag_core.commands.study import cell_raw, study_plan
from gadiag_core.errors import UsageError
from gadiag_core.reports.study_report import kendall_tau, ranks, study_html, study_markdown, study_matrix, universal_sentence


def summary(means: dict, cis: dict | None = None, accuracy=0.5, headroom=None) -> dict:
    """A hand-made summary.json: teacher rows with a mean and an interval, and the reference rows."""
    cis = cis or {}
    rows = {name: {"mean_all": m, "ci_all": list(cis.get(name, (m - 0.05, m + 0.05))), "nodes": 10} for name, m in means.items()}
    rows["rl_outcome"] = {"mean_all": 0.9, "ci_all": [0.8, 1.0], "nodes": 10}  # never a candidate
    rows["noise_ceiling"] = {"mean_all": 0.7, "ci_all": [0.6, 0.8], "nodes": 10}
    out = {"rows": rows, "accuracy": accuracy, "rollouts": 8}
    if headroom is not None:
        out["oracle"] = {"all": {"headroom": headroom, "headroom_ci": [headroom - 0.02, headroom + 0.02]}, "switch_rate": 0.5}
    return out


def test_kendall_tau_and_ranks_by_hand():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one discordant pair of six: (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    # τ-b with a tie in y: C = 2, D = 0, T_y = 1 -> 2 / sqrt(2 * 3)
    assert kendall_tau([1, 2, 3], [1, 2, 2]) == pytest.approx(2 / math.sqrt(6))
    assert math.isnan(kendall_tau([1, 1], [2, 3]))
    assert ranks({"a": 0.1, "b": 0.3, "c": 0.3, "d": float("nan")}) == {"b": 1, "c": 1, "a": 3}


def test_matrix_with_a_universal_row():
    cells = {
        "s1 × math": summary({"solution/rkl": 0.40, "answer/rkl": 0.30, "wrong/rkl": -0.10}, {"solution/rkl": (0.28, 0.5)}),
        "s1 × words": summary({"solution/rkl": 0.20, "answer/rkl": 0.25, "wrong/rkl": 0.00}, {"answer/rkl": (0.15, 0.35)}, headroom=0.04),
    }
    m = study_matrix(cells)
    assert m["cells"] == ["s1 × math", "s1 × words"]
    assert m["view"]["s1 × math"]["best"] == "solution/rkl"
    assert m["view"]["s1 × words"]["best"] == "answer/rkl"
    assert m["view"]["s1 × math"]["best_ci"] == [0.28, 0.5]
    assert m["view"]["s1 × math"]["ranks"] == {"solution/rkl": 1, "answer/rkl": 2, "wrong/rkl": 3}
    # answer/rkl 0.30 >= 0.28 in math and is the best in words; solution/rkl 0.20 >= 0.15 in words
    assert m["universal"] == ["answer/rkl", "solution/rkl"]
    assert m["coverage"]["wrong/rkl"] == []
    assert m["tau"]["s1 × math|s1 × words"] == pytest.approx(1 / 3)  # a/s swap: C = 2, D = 1
    assert "rl_outcome" not in m["rows"] and "noise_ceiling" not in m["rows"]
    assert m["view"]["s1 × words"]["oracle_headroom"] == 0.04
    sentence = universal_sentence(m)
    assert sentence.startswith("Yes: answer/rkl, solution/rkl are within the 95% interval of the best row in all 2 cells")


def test_matrix_without_a_universal_row_names_the_closest():
    cells = {
        "a × math": summary({"x": 0.5, "y": 0.1, "z": 0.0}),
        "a × words": summary({"x": 0.0, "y": 0.5, "z": 0.1}),
        "b × math": summary({"x": 0.5, "y": 0.0, "z": 0.1}),
    }
    m = study_matrix(cells)
    assert m["universal"] == []
    assert m["coverage"]["x"] == ["a × math", "b × math"]
    assert m["rows"][0] == "x"  # best mean rank first
    assert universal_sentence(m) == (
        "No: no row is within the 95% interval of the best in every cell; the closest, x, is within it in 2 of 3 cells (not in a × words)."
    )
    assert m["mean_tau"] == pytest.approx((-1 + 1 / 3 - 1 / 3) / 3)
    markdown = study_markdown(m, "demo")
    assert "| x | **1 · +0.500\\*** | 3 · +0.000 | **1 · +0.500\\*** | 2/3 |" in markdown
    assert markdown.rstrip().endswith(universal_sentence(m))
    page = study_html(m, "demo", {"a × math": "cells/a--math/report/index.html"})
    assert "href=\"cells/a--math/report/index.html\"" in page and "within it in 2 of 3 cells" in page


def test_matrix_of_cells_without_intervals_says_it_cannot_decide():
    m = study_matrix({"a × t": summary({"x": 0.5}, {"x": (float("nan"), float("nan"))})})
    assert m["universal"] == []
    assert "cannot be made" in universal_sentence(m)


def test_study_plan_and_cell_config():
    raw = {
        "study": {
            "name": "demo",
            "students": {"small": {"model": "m1", "temperature": 0.7, "tasks": {"math": {"levels": ["L1"]}}, "run": {"in_flight": 2}}},
            "tasks": {"math": {"levels": ["L1", "L2"]}, "wordy": {"task": "wordplay", "levels": ["W1"]}},
        },
        "run": {"task": "math", "questions": 2},
        "task": {"worked_example": False},
    }
    plan = study_plan(raw)
    assert plan["order"] == [("small", "math"), ("small", "wordy")]
    math_cell = cell_raw(plan, "small", "math", "/tmp/x")
    assert math_cell["student"] == {"model": "m1", "temperature": 0.7}
    # the base [task] belongs to run.task (math); the study's options, then the student's own, override it
    assert math_cell["task"] == {"worked_example": False, "levels": ["L1"]}
    words_cell = cell_raw(plan, "small", "wordy", "/tmp/y")
    assert words_cell["run"]["task"] == "wordplay" and words_cell["task"] == {"levels": ["W1"]}
    assert words_cell["run"]["run_dir"] == "/tmp/y" and words_cell["run"]["questions"] == 2
    assert math_cell["run"]["in_flight"] == 2 == words_cell["run"]["in_flight"]  # the student's own [run] keys
    with pytest.raises(UsageError, match="study.students.small.run"):
        cell_raw(study_plan({**raw, "study": {**raw["study"], "students": {"small": {"run": 3}}}}), "small", "math", "/tmp/z")
    assert raw["run"].get("run_dir") is None  # the plan never edits its input
    with pytest.raises(UsageError, match="study.bogus"):
        study_plan({"study": {"bogus": 1, "include_students": ["a"], "include_tasks": ["b"]}})
    with pytest.raises(UsageError, match="no task"):
        study_plan({"study": {"include_students": ["a"]}})
    with pytest.raises(UsageError, match="include_students"):
        study_plan({"study": {"students": ["a"]}})


# ----------------------------------------------------------------------------
# Two tiny cells on the toy model, killed and resumed

STUDY = """
[study]
name = "tiny"
include_tasks = ["low", "high"]

[study.students.toy]
model = "{model}"

[study.tasks.low]
task = "toy"
targets = [3, 4, 5]

[study.tasks.high]
task = "toy"
targets = [8, 9, 10]

[run]
teachers = "solution,answer"
questions = 2
rollouts_per_question = 2
threads = 1

[student]
max_new_tokens = 4
"""

# (config.toml and study.toml name the study directory, which differs between the two studies)
CELL_FILES = ("rollouts.jsonl", "tokens.jsonl", "questions.jsonl", "summary.json")


def study_cli(study_file, study_dir):
    return [sys.executable, "-m", "gadiag_core.commands.main", "study", str(study_file), "--study-dir", str(study_dir)]


def study_outputs(study_dir):
    """The study's and its cells' output bytes; each summary.json without its
    "throughput" block (sampler timings of the session that wrote it)."""
    out = {"study.json": (study_dir / "study.json").read_bytes()}
    for cell in sorted((study_dir / "cells").iterdir()):
        for name in CELL_FILES:
            out[f"{cell.name}/{name}"] = (cell / name).read_bytes()
        summary = json.loads(out[f"{cell.name}/summary.json"])
        summary.pop("throughput", None)
        out[f"{cell.name}/summary.json"] = json.dumps(summary, sort_keys=True).encode()
    return out


def test_study_of_two_tiny_cells_resumes_after_a_kill(tmp_path, toy_model_dir):
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY.format(model=toy_model_dir))
    reference = tmp_path / "reference"
    result = subprocess.run(study_cli(study_file, reference), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "toy × low" in result.stdout and "toy × high" in result.stdout
    assert "interval of the best" in result.stdout or "cannot be made" in result.stdout
    expected = study_outputs(reference)
    assert (reference / "report.html").is_file()
    assert json.loads(expected["study.json"])["cells"] == ["toy × low", "toy × high"]
    assert all(expected[f"{c}/tokens.jsonl"].strip() for c in ("toy--low", "toy--high")), "no node scored: the comparison would be vacuous"

    # Every token record carries each teacher row's cosine against both halves of
    # â* (the oracle's input), and no half-scored pair leaks into the rows.
    tokens = [json.loads(line) for line in expected["toy--low/tokens.jsonl"].decode().splitlines()]
    for token in tokens:
        assert set(token["cos_half"]) == {row for row in token["cos"] if "/" in row}
        assert all(len(pair) == 2 for pair in token["cos_half"].values())
        assert not any("@half" in row for row in token["cos"])
    cell_summary = json.loads(expected["toy--low/summary.json"])
    oracle = cell_summary["oracle"]
    assert oracle["rows"] == ["solution/reverse_kl", "solution/sampled_token", "answer/reverse_kl", "answer/sampled_token"]
    # ... and the cell's leaderboard shows the oracle rows and says what they found.
    from io import StringIO

    from rich.console import Console

    from gadiag_core.reports.leaderboard import print_leaderboard

    buffer = StringIO()
    print_leaderboard(cell_summary, Console(file=buffer, width=220))
    printed = buffer.getvalue()
    # The cell's HTML report: a best-teacher strip on every rollout with scored tokens, the oracle section.
    report = reference / "cells" / "toy--low" / "report"
    pages = [page.read_text() for page in report.glob("question-*.html")]
    assert pages and sum(page.count('class="strip"') for page in pages) == len({(t["question"], t["rollout"]) for t in tokens})
    assert ("Per-token oracle" in (report / "index.html").read_text()) == ("oracle" in oracle.get("all", {}))
    if "oracle" in oracle.get("all", {}):
        assert "per-token oracle (split-half" in printed and "best single row" in printed
        assert "headroom" in printed and "best row changes at" in printed
    else:  # too few usable nodes for an oracle: no table, no claims
        assert "per-token oracle" not in printed

    # Kill the study once the first cell is finished and the second has started.
    resumed = tmp_path / "resumed"
    process = subprocess.Popen(study_cli(study_file, resumed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    second = resumed / "cells" / "toy--high"
    while process.poll() is None and time.time() < deadline:
        if (second / "config.toml").is_file():
            break
        time.sleep(0.02)
    killed = process.poll() is None
    if killed:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert killed, "the study finished before it could be killed"
    assert not (second / "summary.json").exists()
    result = subprocess.run(study_cli(study_file, resumed), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "toy × low: finished, skipped" in result.stderr
    assert study_outputs(resumed) == expected


def test_quick_study_from_flags(tmp_path, toy_model_dir):
    from gadiag_core.commands.study import resolve_study

    base = tmp_path / "harness.toml"
    base.write_text('[run]\ntask = "math"\nquestions = 3\n\n[task]\nlevels = ["L1"]\n')
    plan, study_dir, configs, _, _ = resolve_study(
        ["--students", str(toy_model_dir), "--tasks", "math,wordplay", "--config", str(base), "--threads", "1", "--study-dir", str(tmp_path / "s")]
    )
    labels = list(configs)
    assert labels == [f"{toy_model_dir} × math", f"{toy_model_dir} × wordplay"]
    math_cell, words_cell = configs[labels[0]], configs[labels[1]]
    assert math_cell.task.name == "math" and math_cell.task.options.levels == ["L1"]  # the base [task] is math's
    # wordplay keeps its own defaults (levels unset: chosen by the student's prompt format)
    assert words_cell.task.name == "wordplay" and words_cell.task.options.levels is None
    assert math_cell.student_options.model == str(toy_model_dir) and math_cell.run.threads == 1 and math_cell.run.questions == 3
    assert math_cell.run.run_dir.startswith(str(tmp_path / "s" / "cells"))
    with pytest.raises(UsageError, match="study cell .* × nope"):
        resolve_study(["--students", "x", "--tasks", "nope", "--config", str(base)])
