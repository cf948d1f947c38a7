"""Interrupted runs resume to exactly the result of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

CONFIG = """
[run]
task = "toy"
teachers = "solution,answer,self_success"
questions = 3
rollouts_per_question = 3
threads = 1

[student]
max_new_tokens = 4
"""

OUTPUT_FILES = ("rollouts.jsonl", "tokens.jsonl", "questions.jsonl", "summary.json")


def cli(config, model_dir, run_dir):
    return [sys.executable, "-m", "gadiag_core.commands.main", "--config", str(config), "--model", str(model_dir), "--run-dir", str(run_dir)]


def run_to_end(argv):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy_model_dir):
    root = tmp_path_factory.mktemp("resume")
    config = root / "harness.toml"
    config.write_text(CONFIG)
    run_dir = root / "reference"
    started = time.time()
    run_to_end(cli(config, toy_model_dir, run_dir))
    return config, run_dir, time.time() - started


def read_outputs(run_dir):
    """The output files' bytes; summary.json without its "throughput" block
    (sampler timings of the session that wrote it, which no two runs share)."""
    out = {name: (run_dir / name).read_bytes() for name in OUTPUT_FILES}
    summary = json.loads(out["summary.json"])
    assert "throughput" in summary
    summary.pop("throughput")
    out["summary.json"] = json.dumps(summary, sort_keys=True).encode()
    return out


def test_same_config_and_seed_give_identical_records(reference, toy_model_dir, tmp_path):
    config, reference_dir, _ = reference
    run_to_end(cli(config, toy_model_dir, tmp_path / "again"))
    assert read_outputs(tmp_path / "again") == read_outputs(reference_dir)
    assert (reference_dir / "tokens.jsonl").read_text().strip(), "no node scored: the comparison would be vacuous"


def kill_after_units(argv, run_dir, units: int, extra_delay: float) -> bool:
    """Start a run, SIGKILL it once `units` rollouts are diagnosed (plus a short
    random delay, so some kills land inside a unit). True if it was killed."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while process.poll() is None and time.time() < deadline:
        if len(list((run_dir / "units").glob("*.json"))) >= units:
            time.sleep(extra_delay)
            break
        time.sleep(0.02)
    killed = process.poll() is None
    if killed:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return killed and not (run_dir / "summary.json").exists()


def test_sigkill_at_random_points_then_resume(reference, toy_model_dir, tmp_path):
    config, reference_dir, _ = reference
    expected = read_outputs(reference_dir)
    rng = random.Random(1234)
    interrupted = 0
    for attempt in range(2):
        run_dir = tmp_path / f"killed{attempt}"
        argv = cli(config, toy_model_dir, run_dir)
        # Two kills at random points (the second on the resumed run), then resume to the end.
        first, second = sorted(rng.sample(range(0, 9), 2))
        interrupted += kill_after_units(argv, run_dir, first, rng.uniform(0, 0.3))
        interrupted += kill_after_units(argv, run_dir, second, rng.uniform(0, 0.3))
        run_to_end(argv)
        assert read_outputs(run_dir) == expected, f"attempt {attempt} differs from the uninterrupted run"
        questions = [json.loads(line) for line in (run_dir / "questions.jsonl").read_text().splitlines()]
        keys = [(q["question"], q["rollout"]) for q in questions]
        assert len(keys) == len(set(keys)) == 9  # nothing lost, nothing duplicated
        assert not list(run_dir.rglob("*.tmp"))
    assert interrupted >= 3, "the kills did not land inside runs: the test proved nothing"


def test_resume_with_other_settings_is_refused(reference, toy_model_dir, tmp_path):
    config, reference_dir, _ = reference
    result = subprocess.run(
        cli(config, toy_model_dir, reference_dir) + ["--seed", "7"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "run.seed = 0, not 7" in result.stderr
