"""Rollouts in flight together: the same records as one after another, in
fewer, larger sampler calls (gadiag_core.engine.scheduler)."""

import json

import pytest

from gadiag_core.commands.main import main
from gadiag_core.engine.scheduler import SamplerStats, run_interleaved
from gadiag_core.interfaces import CallSession


def echo_generator(key, rounds):
    """Yields `rounds` batches of requests (key, round, i); returns what came back."""
    got = []
    for r in range(rounds):
        outputs = yield [(key, r, i) for i in range(r + 1)]
        got.append(outputs)
    return got


class _Echo:
    """A stand-in sampler: each request's output names it."""

    def __init__(self):
        self.calls = []

    def sample(self, lm, requests, temperature):
        self.calls.append(len(requests))
        return [f"out{request}" for request in requests]


@pytest.mark.parametrize("in_flight", [1, 2, 5])
def test_each_generator_gets_its_own_outputs(in_flight):
    sampler = _Echo()
    done = {}
    starts = [(k, (lambda k=k: echo_generator(k, 1 + k % 3))) for k in range(5)]
    run_interleaved(starts, CallSession(sampler, None, 1.0), in_flight, lambda key, value: done.__setitem__(key, value))
    calls = sampler.calls
    assert sorted(done) == list(range(5))
    for k, got in done.items():
        assert got == [[f"out{(k, r, i)}" for i in range(r + 1)] for r in range(1 + k % 3)]
    # Requests of different generators share calls once more than one is in flight.
    assert sum(calls) == sum(sum(r + 1 for r in range(1 + k % 3)) for k in range(5))
    assert len(calls) == (sum(1 + k % 3 for k in range(5)) if in_flight == 1 else len(calls))
    if in_flight > 1:
        assert len(calls) < sum(1 + k % 3 for k in range(5))


class _OneAtATime(CallSession):
    """A session whose runs return one finished request at a time, last added
    first: generators must get each of their outputs in its own place, and
    only once all of theirs are back."""

    def run(self):
        if not self.queue:
            return []
        ticket, request = self.queue.pop()
        return [(ticket, self.sampler.sample(self.lm, [request], self.temperature)[0])]


def test_outputs_return_in_any_order_and_generators_wait_for_all_of_theirs():
    done = {}
    starts = [(k, (lambda k=k: echo_generator(k, 3))) for k in range(4)]
    run_interleaved(starts, _OneAtATime(_Echo(), None, 1.0), 2, done.__setitem__)
    assert done == {k: [[f"out{(k, r, i)}" for i in range(r + 1)] for r in range(3)] for k in range(4)}


def test_generators_that_need_no_sampling_finish_at_once():
    def nothing():
        return "done"
        yield  # a generator that returns before yielding

    def empty_rounds():
        got = yield []
        got2 = yield []
        return (got, got2)

    class Refuse:
        def sample(self, lm, requests, temperature):
            pytest.fail("no call expected")

    done = {}
    run_interleaved([("a", nothing), ("b", empty_rounds)], CallSession(Refuse(), None, 1.0), 3, done.__setitem__)
    assert done == {"a": "done", "b": ([], [])}


def test_sampler_stats_accounting():
    class Fake:
        def sample(self, lm, requests, temperature):
            return [[1] * n for n in requests]

    stats = SamplerStats()
    stats.sample(Fake(), None, [2, 3], 1.0)
    stats.sample(Fake(), None, [4], 1.0)
    out = stats.summary(wall_seconds=10.0)
    assert out["sampler_calls"] == 2 and out["sampler_requests"] == 3 and out["sampled_tokens"] == 9
    assert out["mean_batch_size"] == 1.5 and 0 <= out["share_outside_sampler"] <= 1
    assert out["decode_steps_by_rows"] == []  # a sampler that does not count its steps


def test_sampler_stats_steps_at_rows():
    """Steps and seconds per batch size, draws redone and their seconds, and
    prefix tokens encoded and seconds in joins, are the sampler's counts
    during the run's calls only (a stream's counters run on between calls)."""
    from types import SimpleNamespace

    class Counting:
        steps_at_rows = {4: [1, 0.5]}  # before the run: not the run's
        decode_steps, decoded_rows = 1, 4
        redraw = SimpleNamespace(count=2, seconds=1.0)
        prefix_tokens_encoded, join_seconds = 7, 2.0

        def sample(self, lm, requests, temperature):
            self.redraw.count, self.redraw.seconds = self.redraw.count + 1, self.redraw.seconds + 0.125
            self.prefix_tokens_encoded, self.join_seconds = self.prefix_tokens_encoded + 10 * len(requests), self.join_seconds + 0.5
            for rows in requests:
                at = self.steps_at_rows.setdefault(rows, [0, 0.0])
                at[0], at[1] = at[0] + 1, at[1] + 0.25
                self.decode_steps, self.decoded_rows = self.decode_steps + 1, self.decoded_rows + rows
            return [[1] * rows for rows in requests]

    sampler, stats = Counting(), SamplerStats()
    stats.sample(sampler, None, [4, 2, 4], 1.0)
    stats.sample(sampler, None, [3], 1.0)
    out = stats.summary(wall_seconds=10.0)
    assert out["decode_steps_by_rows"] == [[2, 1, 0.25], [3, 1, 0.25], [4, 2, 0.5]]
    assert out["decode_steps"] == 4 and out["mean_rows_per_step"] == 3.2
    assert (out["redrawn_draws"], out["redraw_seconds"]) == (2, 0.25)
    assert (out["prefix_tokens_encoded"], out["join_seconds"]) == (40, 1.0)


TOY_CONFIG = """
[run]
task = "toy"
teachers = "all"
questions = 4
rollouts_per_question = 3
threads = 1

[student]
max_new_tokens = 4
"""

RECORDS = ("rollouts.jsonl", "tokens.jsonl", "questions.jsonl")


def test_records_do_not_depend_on_rollouts_in_flight(tmp_path, toy_model_dir, capsys):
    """On the toy student, one rollout at a time and twelve in flight give the
    same records in fewer, larger sampler calls. (On a real model differently
    batched matmuls round differently and a rare token can flip; resumption
    stays exact because a run always batches in the same fixed waves.)"""
    config = tmp_path / "harness.toml"
    config.write_text(TOY_CONFIG)
    files, speed = {}, {}
    for in_flight in (1, 12):
        run_dir = tmp_path / f"in-flight-{in_flight}"
        code = main(["--config", str(config), "--model", str(toy_model_dir), "--run-dir", str(run_dir), "--set", f"run.in_flight={in_flight}"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "tokens/s" in out  # the leaderboard footer reports the sampler's work
        files[in_flight] = {name: (run_dir / name).read_bytes() for name in RECORDS}
        speed[in_flight] = json.loads((run_dir / "summary.json").read_text())["throughput"]
    assert files[1]["tokens.jsonl"].strip(), "no node scored: the comparison would be vacuous"
    assert files[1] == files[12]
    assert speed[12]["sampler_calls"] < speed[1]["sampler_calls"]
    assert speed[12]["mean_batch_size"] > speed[1]["mean_batch_size"]
    for way in speed.values():  # summary.json's steps by batch size add up to its step counts
        by_rows = way["decode_steps_by_rows"]
        assert sum(steps for _, steps, _ in by_rows) == way["decode_steps"] > 0
        assert round(sum(rows * steps for rows, steps, _ in by_rows) / way["decode_steps"], 1) == way["mean_rows_per_step"]
        assert all(seconds > 0 for _, _, seconds in by_rows)
    assert max(rows for rows, _, _ in speed[12]["decode_steps_by_rows"]) > max(rows for rows, _, _ in speed[1]["decode_steps_by_rows"])


def test_longest_rollouts_start_first(monkeypatch):
    """diagnose_locally hands the scheduler the longest rollouts first (ties
    in rollout order), each with its question's siblings."""
    from types import SimpleNamespace

    from gadiag_core.engine import pipeline

    problem_a, problem_b = SimpleNamespace(id="a"), SimpleNamespace(id="b")
    lengths = [(problem_a, 3), (problem_a, 9), (problem_b, 9), (problem_b, 1), (problem_a, 5)]
    rollouts = [SimpleNamespace(problem=p, index=i, generated_ids=[0] * n) for i, (p, n) in enumerate(lengths)]
    seen = {}

    def capture(starts, session, in_flight, on_done):
        seen["starts"] = list(starts)
        seen["in_flight"] = in_flight

    monkeypatch.setattr(pipeline, "run_interleaved", capture)
    pipeline.diagnose_locally(None, rollouts[1:], rollouts, [], None, 3, None, None)
    assert [r.index for r, _ in seen["starts"]] == [1, 2, 4, 3]
    assert seen["in_flight"] == 3
    start = dict((r.index, s) for r, s in seen["starts"])[4]
    assert [r.index for r in start.args[2]] == [0, 1, 4]  # its siblings: question a's rollouts, all of them
