"""`--executor ray` (gadiag_core/engine/ray_executor.py): the files a run writes
do not depend on the executor or on the number of Ray workers; a worker killed
mid-unit is replaced and no unit is lost or written twice; a driver SIGKILLed
mid-run resumes to the same files.

The Ray tests share one local cluster of 2 CPUs started by the module fixture
(Ray's start-up takes seconds); the runs are the toy task on its tiny student.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gadiag_core.commands.main import main

CONFIG = """
[run]
task = "toy"
teachers = "all"
questions = 4
rollouts_per_question = 3
threads = 1
in_flight = 2

[student]
max_new_tokens = 4
"""

RECORDS = ("rollouts.jsonl", "tokens.jsonl", "questions.jsonl", "config.toml")
ROLLOUTS = 12


def outputs(run_dir) -> dict:
    """Every file a run leaves that its results live in, as bytes: the records,
    config.toml (its run_dir line aside: each test writes its own folder), the
    units, and summary.json without its "throughput" block (this session's
    timings and executor)."""
    out = {name: (run_dir / name).read_bytes() for name in RECORDS}
    out["config.toml"] = b"\n".join(line for line in out["config.toml"].splitlines() if not line.startswith(b"run_dir ="))
    for unit in sorted((run_dir / "units").iterdir()):
        out[f"units/{unit.name}"] = unit.read_bytes()
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("throughput")
    out["summary.json"] = json.dumps(summary, sort_keys=True).encode()
    return out


def run_in_process(config, model_dir, run_dir, *flags, capsys=None) -> str:
    code = main(["--config", str(config), "--model", str(model_dir), "--run-dir", str(run_dir), *flags])
    err = capsys.readouterr().err if capsys else ""
    assert code == 0, err
    return err


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, toy_model_dir):
    """CONFIG with an external model teacher too (the toy student itself): its
    `info` reaches summary.json from the workers, who alone load teachers."""
    path = tmp_path_factory.mktemp("ray-config") / "harness.toml"
    path.write_text(CONFIG + f'\n[teachers.external]\nmodel = "{toy_model_dir}"\ncontext = "answer"\n')
    return path


@pytest.fixture(scope="module")
def local_reference(config_path, toy_model_dir, tmp_path_factory):
    """The run with the local executor: the files every Ray run must reproduce."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    assert main(["--config", str(config_path), "--model", str(toy_model_dir), "--run-dir", str(run_dir)]) == 0
    files = outputs(run_dir)
    assert files["tokens.jsonl"].strip(), "no node scored: the comparisons would be vacuous"
    assert len([name for name in files if name.startswith("units/")]) == ROLLOUTS
    assert json.loads(files["summary.json"])["teacher_info"]["external"]["via"] == "ids"
    return files


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the module; yields its address (for
    driver subprocesses)."""
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'gadiag[ray]' to run the Ray executor tests")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------
# Bad input: one line, exit 2, no folder (these need no cluster)


def test_ray_missing_says_how_to_install(config_path, toy_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    code = main(["--config", str(config_path), "--model", str(toy_model_dir), "--run-dir", str(tmp_path / "run"), "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install 'gadiag[ray]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, env, says",
    [
        (["--ray-address", "not an address"], "", "is not a Ray address"),
        (["--ray-address", "127.0.0.1:1"], "", "no Ray cluster answers at --ray-address '127.0.0.1:1'"),
        ([], "127.0.0.1:1", "no Ray cluster answers at RAY_ADDRESS '127.0.0.1:1'"),
    ],
)
def test_bad_ray_address_fails_fast_in_one_line(flags, env, says, config_path, toy_model_dir, tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'gadiag[ray]'")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh driver, whatever this process holds
    monkeypatch.setenv("RAY_ADDRESS", env)
    started = time.time()
    code = main(["--config", str(config_path), "--model", str(toy_model_dir), "--run-dir", str(tmp_path / "run"), "--executor", "ray", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and len(err.strip().splitlines()) == 1
    assert time.time() - started < 60  # Ray's own connection retries would take minutes
    assert not (tmp_path / "run").exists()


def test_more_workers_than_the_cluster_holds_is_refused(ray_cluster, config_path, toy_model_dir, tmp_path, capsys):
    code = main(["--config", str(config_path), "--model", str(toy_model_dir), "--run-dir", str(tmp_path / "run"), "--executor", "ray", "--workers", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "--workers 3 need 3 CPUs and 0 GPUs" in err and "has 2 and 0" in err
    assert not (tmp_path / "run").exists()


def test_executor_keys_are_not_part_of_the_run(config_path, toy_model_dir, tmp_path):
    """A run's config.toml leaves out where it ran, so a local run resumes on
    Ray and the other way round (tests below) and files match byte for byte."""
    from gadiag_core.commands.run import resolve_config

    config, _ = resolve_config(["--config", str(config_path), "--executor", "ray", "--workers", "3", "--ray-address", "auto"])
    assert (config.run.executor, config.run.workers, config.run.ray_address) == ("ray", 3, "auto")
    assert not {"executor", "workers", "ray_address", "worker_cpus", "worker_gpus"} & set(config.to_dict()["run"])


# ----------------------------------------------------------------------------
# On a local Ray cluster


def test_two_ray_workers_write_the_local_files(ray_cluster, config_path, toy_model_dir, local_reference, tmp_path, capsys):
    run_dir = tmp_path / "ray"
    run_in_process(config_path, toy_model_dir, run_dir, "--executor", "ray", "--workers", "2", capsys=capsys)
    assert outputs(run_dir) == local_reference
    throughput = json.loads((run_dir / "summary.json").read_text())["throughput"]
    assert (throughput["executor"], throughput["workers"]) == ("ray", 2) and throughput["worker_start_seconds"] > 0
    assert throughput["sampler_calls"] > 0  # the workers' sampler accounting reached the driver
    assert sum(steps for _, steps, _ in throughput["decode_steps_by_rows"]) == throughput["decode_steps"] > 0


@pytest.mark.parametrize("restarts", [2, 0], ids=["restarted-by-ray", "wave-moved-to-the-other-worker"])
def test_a_worker_killed_mid_unit_is_replaced(restarts, ray_cluster, config_path, toy_model_dir, local_reference, tmp_path, monkeypatch, capsys):
    """The kill-once hook makes the first worker to reach a sampler call SIGKILL
    itself (its student and teacher forwards done: mid-unit). With restarts
    Ray restarts it and runs the wave again; without, the driver drops it and
    gives the wave to the other worker. Nothing is lost, nothing written twice."""
    from gadiag_core.engine import ray_executor

    monkeypatch.setattr(ray_executor, "RESTARTS", restarts)
    marker = tmp_path / "killed"
    monkeypatch.setenv("GADIAG_RAY_KILL_ONCE", str(marker))
    run_dir = tmp_path / "ray"
    err = run_in_process(config_path, toy_model_dir, run_dir, "--executor", "ray", "--workers", "2", capsys=capsys)
    assert marker.exists(), "no worker was killed: the test proved nothing"
    if restarts == 0:
        assert "a Ray worker died" in err and "goes to another" in err
    assert outputs(run_dir) == local_reference
    keys = [(q["question"], q["rollout"]) for q in map(json.loads, (run_dir / "questions.jsonl").read_text().splitlines())]
    assert len(keys) == len(set(keys)) == ROLLOUTS


def test_driver_sigkilled_mid_run_resumes_to_the_same_files(ray_cluster, config_path, toy_model_dir, local_reference, tmp_path):
    """A driver process on the cluster, SIGKILLed once some units are written
    (Ray then ends its actors), then resumed with the same --run-dir."""
    run_dir = tmp_path / "ray"
    argv = [sys.executable, "-m", "gadiag_core.commands.main", "--config", str(config_path), "--model", str(toy_model_dir),
            "--run-dir", str(run_dir), "--executor", "ray", "--workers", "2", "--ray-address", ray_cluster]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while process.poll() is None and time.time() < deadline and not list((run_dir / "units").glob("*.json")):
        time.sleep(0.02)
    assert process.poll() is None, f"the driver ended before it could be killed: {process.stderr.read()[-2000:]}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = len(list((run_dir / "units").glob("*.json")))
    assert 0 < written < ROLLOUTS and not (run_dir / "summary.json").exists()
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outputs(run_dir) == local_reference
    assert not list(run_dir.rglob("*.tmp"))
