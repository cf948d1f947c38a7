"""Ray scaling: one job with the local executor, then with 1 and 2 Ray workers
(`run.worker_cpus = 1` each, one torch thread each), on one local Ray cluster
started here, in one process, back to back.

Printed per way: wall time of the whole run (model loading, student rollouts
on the driver, diagnosis), the workers' start-up (actors created until every
one has loaded its models), and the ratio local / way; then the time to start
the local Ray cluster, whether every way's files are byte-identical, and the
load average before and after.

    python benchmarks/ray_scaling.py                     # the README's default job (harness.toml)
    python benchmarks/ray_scaling.py --questions 2       # a quick look

The local executor runs on one thread too (`--threads 1`), so a worker and the
local executor have the same compute and the ratios show what more workers
buy. A wave (run.in_flight rollouts; here --in-flight, default 8, not the
run's default of 16) is what a worker diagnoses: the default job's 24
rollouts are 3 waves of 8, so 2 workers can at best halve the diagnosis (2
waves, then 1); at 16 they would be 2 waves of 16 and 8. Needs `pip install 'gadiag[ray]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import RECORDS, ROOT, load_average  # noqa: E402  (benchmarks/pipeline.py)


def run_once(argv: list[str], run_dir: Path) -> tuple[float, dict, dict]:
    """(wall seconds, summary "throughput", the records' and units' bytes)."""
    from rich.console import Console

    from gadiag_core.commands.run import resolve_config
    from gadiag_core.engine.pipeline import run

    config, registry = resolve_config(argv + ["--run-dir", str(run_dir)])
    start = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        _, summary = run(config, registry, Console(file=quiet, stderr=False))
    wall = time.perf_counter() - start
    files = {name: (run_dir / name).read_bytes() for name in RECORDS}
    files.update({f"units/{p.name}": p.read_bytes() for p in sorted((run_dir / "units").iterdir())})
    return wall, summary["throughput"], files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "harness.toml"))
    p.add_argument("--questions", type=int, help="override run.questions (default: the config's)")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to measure (default 1,2)")
    p.add_argument("--in-flight", type=int, default=8, help="run.in_flight, the wave a worker takes (default 8: the default job's 24 rollouts in 3 waves)")
    args = p.parse_args()
    import ray

    counts = [int(x) for x in args.workers.split(",")]
    base = ["--config", args.config, "--threads", "1", "--set", f"run.in_flight={args.in_flight}"]
    if args.questions:
        base += ["--questions", str(args.questions)]
    print(f"load average before: {load_average()}  (cores: {os.cpu_count()})")
    started = time.perf_counter()
    ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    cluster_seconds = time.perf_counter() - started
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ways = [("local", [])] + [(f"ray, {n} worker{'s' * (n > 1)}", ["--executor", "ray", "--workers", str(n), "--set", "run.worker_cpus=1"]) for n in counts]
        for index, (label, flags) in enumerate(ways):
            wall, speed, files = run_once(base + flags, Path(tmp) / str(index))
            rows.append((label, wall, speed, files))
            print(f"  {label}: {wall:.1f} s", file=sys.stderr)
    ray.shutdown()
    print(f"load average after:  {load_average()}")
    local_wall = rows[0][1]
    print(f"{'way':<16} {'wall s':>8} {'worker start s':>15} {'local / way':>12}")
    for label, wall, speed, _ in rows:
        start = speed.get("worker_start_seconds")
        print(f"{label:<16} {wall:8.1f} {'' if start is None else f'{start:.1f}':>15} {local_wall / wall:11.2f}×")
    print(f"local Ray cluster start: {cluster_seconds:.1f} s")
    print(f"files identical across ways: {json.dumps(all(r[3] == rows[0][3] for r in rows))} ({len(rows[0][3]) - len(RECORDS)} units)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
