"""`run.executor = "ray"`: waves of rollouts diagnosed by Ray actors (DESIGN §7).

    driver (gadiag_core.engine.pipeline)          actors (DiagnosisWorker, run.workers of them)
    samples the student rollouts, writes them     load student + teachers once
    sends waves [start, stop) of rollouts   --->  diagnose_locally on that wave
    writes each returned unit, atomically   <---  (token records, rollout record) per rollout
    assembles the files in a fixed order

The unit an actor receives is a *wave* (run.in_flight rollouts), the unit the
local executor batches: an actor diagnoses it with the very function the local
executor uses, so every sampler call holds the requests it holds locally and
the records are byte-identical whichever executor and however many workers ran
them (tests/test_executor_ray.py). Only the driver writes to the run directory,
so resuming with `--run-dir` works as it does locally.

A worker that dies (killed, out of memory, node lost) is restarted by Ray and
its wave is run again (`max_restarts`, `max_task_retries`); a worker that keeps
dying is dropped and its wave goes to another one. A wave that has killed
workers `MAX_WAVE_FAILURES` times ends the run with one line (the units written
so far are kept: rerun to resume).

Ray is imported only here and only when `--executor ray` is asked for: it is an
optional extra (`pip install 'gadiag[ray]'`).

Test hook: with `GADIAG_RAY_KILL_ONCE=PATH` set in the driver's environment,
the first worker to reach a sampler call of a wave (its student and teacher
forwards done) while PATH does not exist creates PATH and SIGKILLs itself: a
worker dying mid-unit, once.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import deque

from rich.console import Console

from gadiag_core.config import RunConfig
from gadiag_core.errors import EnvironmentFailure, UsageError

KILL_ONCE_ENV = "GADIAG_RAY_KILL_ONCE"
MAX_WAVE_FAILURES = 3
RESTARTS = 2  # per actor, by Ray, each retrying the wave it held


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs the ray package, which is not installed: pip install 'gadiag[ray]' (or run with --executor local)") from None
    return ray


def cluster_address(config: RunConfig) -> tuple[str | None, str]:
    """(address, where it came from): --ray-address, else $RAY_ADDRESS, else
    None (a local cluster for this run)."""
    if config.run.ray_address:
        return config.run.ray_address, "--ray-address"
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return (address, "RAY_ADDRESS") if address else (None, "")


def check_reachable(address: str | None, source: str = "--ray-address") -> None:
    """A host:port address must answer before ray.init, which otherwise
    retries for minutes: UsageError naming it and the fix."""
    if address in (None, "auto", "local"):
        return
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = rest.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise UsageError(
            f"no Ray cluster answers at {source} {address!r} ({reason}): start one there with `ray start --head`, "
            "fix the address (host:port of the head, ray://host:10001 or auto), or unset --ray-address and RAY_ADDRESS for a local cluster"
        ) from None


class RayExecutor:
    """The driver's side: the connection, the actors, the dispatch of waves."""

    def __init__(self, ray, config: RunConfig, console: Console, started_here: bool):
        self.ray, self.config, self.console, self.started_here = ray, config, console, started_here
        self.actors: list = []
        self.ready_refs: list = []
        self.teacher_infos: dict = {}  # the teachers' `info`, as a worker loaded them
        self.start_seconds = 0.0
        self._t0 = time.perf_counter()

    # -- start-up -------------------------------------------------------------

    @classmethod
    def start(cls, config: RunConfig, console: Console) -> "RayExecutor":
        """Connect (or start a local cluster) and start the actors; they load
        their models while the driver loads its own (`wait_ready`)."""
        ray = import_ray()
        started_here = False
        if not ray.is_initialized():
            address, source = cluster_address(config)
            check_reachable(address, source)
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            except Exception as exc:  # ConnectionError, ValueError, RuntimeError: one line
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise UsageError(
                    f"cannot start or join a Ray cluster (address {address or 'local'!r}): {reason}; "
                    "fix --ray-address / RAY_ADDRESS, or leave both unset for a local cluster"
                ) from None
            started_here = True
        self = cls(ray, config, console, started_here)
        try:
            self._start_actors()
        except BaseException:
            self.close()
            raise
        return self

    def _worker_count(self) -> int:
        run = self.config.run
        total = self.ray.cluster_resources()
        if run.workers:
            cpus, gpus = run.workers * run.worker_cpus, run.workers * run.worker_gpus
            if cpus > total.get("CPU", 0) + 1e-9 or gpus > total.get("GPU", 0) + 1e-9:
                raise UsageError(
                    f"--workers {run.workers} need {cpus:g} CPUs and {gpus:g} GPUs (run.worker_cpus = {run.worker_cpus:g}, "
                    f"run.worker_gpus = {run.worker_gpus:g} each) but the Ray cluster has {total.get('CPU', 0):g} and "
                    f"{total.get('GPU', 0):g}: ask for fewer workers (0 = as many as fit) or add nodes first"
                )
            return run.workers
        fits = []
        if run.worker_cpus > 0:
            fits.append(int(total.get("CPU", 0) // run.worker_cpus))
        if run.worker_gpus > 0:
            fits.append(int(total.get("GPU", 0) // run.worker_gpus))
        count = min(fits) if fits else 1
        if count < 1:
            raise UsageError(
                f"the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs, too few for one worker of "
                f"run.worker_cpus = {run.worker_cpus:g}, run.worker_gpus = {run.worker_gpus:g}: lower them or add nodes"
            )
        return count

    def _start_actors(self) -> None:
        ray, run = self.ray, self.config.run
        count = self._worker_count()
        threads = run.threads or max(1, int(run.worker_cpus))
        options = {"num_cpus": run.worker_cpus, "num_gpus": run.worker_gpus, "max_restarts": RESTARTS, "max_task_retries": RESTARTS}
        env = {KILL_ONCE_ENV: os.environ[KILL_ONCE_ENV]} if os.environ.get(KILL_ONCE_ENV) else {}
        if env:
            options["runtime_env"] = {"env_vars": env}
        worker = ray.remote(DiagnosisWorker).options(**options)
        raw = self.config.to_dict()
        self.actors = [worker.remote(raw, threads) for _ in range(count)]
        self.ready_refs = [actor.ready.remote() for actor in self.actors]

    def wait_ready(self) -> None:
        """Block until every actor has loaded its models; a model it could not
        load is the UsageError it met (one line)."""
        ray = self.ray
        with self.console.status(f"starting {len(self.actors)} Ray workers…"):
            pending = list(self.ready_refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=600)
                if not ready:
                    raise EnvironmentFailure(
                        f"{len(pending)} of {len(self.actors)} Ray workers did not start within 10 minutes: the cluster may lack "
                        f"{self.config.run.worker_cpus:g} CPUs / {self.config.run.worker_gpus:g} GPUs per worker; lower --workers"
                    )
                for ref in ready:
                    out = self._get(ref, "starting")
                    raise_error(out)
                    self.teacher_infos = out["teacher_infos"]
        self.start_seconds = time.perf_counter() - self._t0

    def _get(self, ref, doing: str):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            return {"died": str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "the worker died"}
        except self.ray.exceptions.RayTaskError as exc:  # a plugin's own exception on the worker: name it
            cause = getattr(exc, "cause", None) or exc
            reason = (str(cause).strip().splitlines() or [""])[0][:300]
            raise EnvironmentFailure(f"a Ray worker failed while {doing}: {type(cause).__name__}{': ' + reason if reason else ''}") from None
        except self.ray.exceptions.RayError as exc:
            raise EnvironmentFailure(f"a Ray worker failed while {doing}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]}") from None

    # -- diagnosis ------------------------------------------------------------

    def diagnose(self, rollouts: list, waves: list[tuple[int, int]], finished, stats) -> None:
        """Diagnose `waves` ([start, stop) into `rollouts`) on the actors, each
        actor holding one wave at a time; `finished(rollout, result)` is
        called on this process, per rollout in wave order, as waves return.
        Sampler accounting is added to `stats`."""
        ray = self.ray
        rows = [{"question": r.problem.id, "rollout": r.index, "generated_ids": r.generated_ids, "text": r.text, "correct": r.correct} for r in rollouts]
        rows_ref = ray.put(rows)
        todo = deque(waves)
        idle = list(self.actors)
        running: dict = {}  # ref -> (actor, wave)
        failures: dict[tuple[int, int], int] = {}
        while todo or running:
            while idle and todo:
                actor, wave = idle.pop(0), todo.popleft()
                # The rows travel as a reference inside a list, so Ray does not
                # resolve it: an actor fetches them once and keeps them.
                running[actor.diagnose_wave.remote([rows_ref], wave[0], wave[1])] = (actor, wave)
            if not running:
                raise EnvironmentFailure(f"every Ray worker died; {len(todo)} waves of rollouts are left: units written so far are kept, rerun the same command to resume")
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                actor, wave = running.pop(ref)
                out = self._get(ref, f"diagnosing rollouts {wave[0]}–{wave[1] - 1}")
                if "died" in out:  # Ray's own restarts and retries are spent: drop it, requeue the wave
                    failures[wave] = failures.get(wave, 0) + 1
                    first = rollouts[wave[0]]
                    if failures[wave] >= MAX_WAVE_FAILURES:
                        raise EnvironmentFailure(
                            f"Ray workers died {failures[wave]} times diagnosing the wave of rollouts {wave[0]}–{wave[1] - 1} "
                            f"(from question {first.problem.id!r}): {out['died']}; units written so far are kept, rerun to resume"
                        )
                    self.console.print(f"a Ray worker died ({out['died']}); its wave of rollouts {wave[0]}–{wave[1] - 1} goes to another", style="yellow", markup=False, highlight=False)
                    todo.appendleft(wave)
                    continue
                raise_error(out)
                for index, result in out["results"]:
                    finished(rollouts[index], result)
                add_stats(stats, out["stats"])
                idle.append(actor)

    def describe(self) -> dict:
        """This session's executor, for summary.json's "throughput" block. The
        sampler seconds there are summed over the workers, which run at the
        same time: the share of the wall time outside the sampler means
        nothing then and is left out (null)."""
        return {"executor": "ray", "workers": len(self.actors), "worker_start_seconds": round(self.start_seconds, 3), "share_outside_sampler": None}

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []
        if self.started_here:
            self.ray.shutdown()


def raise_error(out: dict) -> None:
    """An actor's reported UsageError / EnvironmentFailure, raised here as one line."""
    error = out.get("error")
    if error:
        kind, message = error
        raise (UsageError if kind == "UsageError" else EnvironmentFailure)(message)
    if "died" in out:
        raise EnvironmentFailure(f"a Ray worker died while loading its models: {out['died']}")


def add_stats(stats, part: dict) -> None:
    stats.calls += part["calls"]
    stats.requests += part["requests"]
    stats.tokens += part["tokens"]
    stats.seconds += part["seconds"]
    stats.batch_sizes.extend(part["batch_sizes"])
    stats.redraws += part.get("redraws", 0)
    stats.redraw_seconds += part.get("redraw_seconds", 0.0)
    stats.steps += part.get("steps", 0)
    stats.row_steps += part.get("row_steps", 0)
    stats.prefix_tokens += part.get("prefix_tokens", 0)
    stats.join_seconds += part.get("join_seconds", 0.0)
    for rows, steps, seconds in part.get("steps_at_rows", []):
        stats.add_steps_at_rows(rows, steps, seconds)


class DiagnosisWorker:
    """One Ray actor (made remote by RayExecutor): the run's components, built
    once from the resolved config, and the diagnosis of waves."""

    def __init__(self, raw_config: dict, threads: int):
        self.error = None
        self.rows_key = None
        try:
            self._load(raw_config, threads)
        except (UsageError, EnvironmentFailure) as exc:
            self.error = (type(exc).__name__, str(exc))

    def _load(self, raw: dict, threads: int) -> None:
        import torch

        from gadiag_core.config import validate
        from gadiag_core.engine.components import build_components
        from gadiag_core.registry import load_registry

        registry = load_registry(raw.get("run", {}).get("plugins_dirs", []))
        self.config = config = validate(raw, registry)
        torch.set_num_threads(threads)
        torch.manual_seed(config.run.seed)
        self.c = build_components(config, registry)
        self.problems = self.c.task.problems(config.run.questions, config.run.seed)

    def ready(self) -> dict:
        """Loaded (or the error met), and the teachers' `info` for summary.json."""
        if self.error:
            return {"error": self.error}
        from gadiag_core.engine.pipeline import teacher_infos

        return {"error": None, "pid": os.getpid(), "teacher_infos": teacher_infos(self.c)}

    def diagnose_wave(self, rows_box: list, start: int, stop: int) -> dict:
        if self.error:
            return {"error": self.error}
        try:
            return self._diagnose(rows_box[0], start, stop)
        except (UsageError, EnvironmentFailure) as exc:
            return {"error": (type(exc).__name__, str(exc))}

    def _diagnose(self, rows_ref, start: int, stop: int) -> dict:
        import ray

        from gadiag_core.engine.pipeline import diagnose_locally, rollouts_from_rows
        from types import SimpleNamespace

        from gadiag_core.engine.scheduler import SamplerStats
        from gadiag_core.interfaces import CallSession

        if self.rows_key != rows_ref.hex():
            rows = ray.get(rows_ref)
            self.rollouts = rollouts_from_rows(self.c, self.problems, rows, self.config.run.rollouts_per_question, "the driver's rollouts", "a gadiag bug: report it")
            self.position = {(r.problem.id, r.index): i for i, r in enumerate(self.rollouts)}
            self.rows_key = rows_ref.hex()
        stats = SamplerStats()
        kill = os.environ.get(KILL_ONCE_ENV)
        c = self.c

        def sample(requests):
            if kill and stats.calls == 0 and _claim(kill):
                os.kill(os.getpid(), signal.SIGKILL)
            return stats.sample(c.sampler, c.student, requests, c.student.temperature)

        results = {}
        # Calls, not a stream: the kill-once hook above fires on a call.
        session = CallSession(SimpleNamespace(sample=lambda lm, requests, temperature: sample(requests)), c.student, c.student.temperature)
        diagnose_locally(c, self.rollouts[start:stop], self.rollouts, self.problems, self.config, stop - start, session,
                         lambda r, result: results.__setitem__(self.position[(r.problem.id, r.index)], result))
        part = {"calls": stats.calls, "requests": stats.requests, "tokens": stats.tokens, "seconds": stats.seconds, "batch_sizes": stats.batch_sizes, "redraws": stats.redraws,
                "redraw_seconds": stats.redraw_seconds, "steps": stats.steps, "row_steps": stats.row_steps,
                "prefix_tokens": stats.prefix_tokens, "join_seconds": stats.join_seconds, "steps_at_rows": [[rows, *at] for rows, at in stats.steps_at_rows.items()]}
        return {"results": sorted(results.items()), "stats": part}


def _claim(path: str) -> bool:
    """True for the one caller that creates `path` (the kill-once test hook)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
