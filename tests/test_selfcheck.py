"""`gadiag-harness selfcheck`: passes on the built-ins and prints its table;
fails (exit 1, a clear message) on a deliberately biased estimator; bad input
is a one-line error (exit 2)."""

from __future__ import annotations

import textwrap

import pytest

from gadiag_core.commands.main import main


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# A small leaderboard check: 2 environments of 8 problems × 4 rollouts, and a
# horizon-5 one of 2 problems × 4 rollouts (the defaults take minutes).
SMALL_LEADERBOARD = (
    "--leaderboard-seeds", "1", "--leaderboard-problems", "8", "--leaderboard-rollouts", "4",
    "--large-seeds", "1", "--large-problems", "2", "--large-rollouts", "3",
)


def test_selfcheck_passes_on_builtins_and_prints_the_table(capsys):
    # Leaderboard tolerances are widened: means over ~60 nodes are too noisy for
    # the defaults, which are set for the default environment sizes.
    code, out, err = run_cli(
        capsys, "selfcheck", "--budgets", "4", "--seeds", "4", "--threads", "1", *SMALL_LEADERBOARD,
        "--lb-max-error", "0.5", "--lb-max-bias", "0.5", "--lb-min-coverage", "0", "--lb-min-overlap", "0",
    )
    assert code == 0, out + err
    assert "selfcheck passed" in out
    for name in ("targeted", "uniform"):
        if name in out:
            assert out.count(name) >= 1
    for column in ("med |Δcos|", "p90 |Δcos|", "cov a*_C", "bias/σ"):
        assert column in out
    for objective in ("reverse_kl", "sampled_token", "forward_kl", "jsd", "topk_reverse_kl"):
        assert objective in out
    assert "FAIL" not in out
    for title in ("leaderboard means of targeted", "default environment", "larger environment", "horizon 5", "budget invariance"):
        assert title in out
    for split in ("correct", "incorrect"):
        assert split in out


def test_selfcheck_leaderboard_gate_fails_out_of_tolerance(capsys):
    """No estimator has leaderboard means within 0.001 of exact on 32 rollouts."""
    code, out, err = run_cli(
        capsys, "selfcheck", "--estimators", "targeted", "--objectives", "reverse_kl", "--budgets", "4", "--seeds", "2",
        "--threads", "1", *SMALL_LEADERBOARD, "--large-horizon", "0", "--lb-max-error", "0.001",
    )
    assert code == 1, out + err
    assert "FAIL leaderboard targeted, default environment, split all: mean |leaderboard − exact|" in out.replace("\n", "")


BIASED_PLUGIN = '''
    """A deliberately biased estimator: `targeted`, with Q̂ of the sampled token shrunk by 40%."""
    import torch

    from gadiag_core import hookimpl
    from gadiag_core.options import as_dict
    from gadiag_core.scoring.vectors import ideal_vector_on_candidates
    from gadiag_plugins.estimation import TargetedOptions
    from gadiag_plugins.estimation.targeted import TargetedEstimator


    class ShrunkSampled(TargetedEstimator):
        def estimate(self, job):
            estimate = super().estimate(job)
            tau = job.student.temperature
            for node in estimate.nodes:
                hit = node.candidates == job.generated_ids[node.node]
                node.q_hat = torch.where(hit, node.q_hat * 0.6, node.q_hat)
                node.q_halves = torch.where(hit, node.q_halves * 0.6, node.q_halves)
                node.ideal, value = ideal_vector_on_candidates(node.probs.double(), node.q_hat.double(), tau)
                node.ideal_halves, _ = ideal_vector_on_candidates(node.probs.double().expand(2, -1), node.q_halves.double(), tau)
                node.value = float(value)
            return estimate


    @hookimpl
    def register_estimators(register):
        register(
            "shrunk_sampled",
            lambda options, run: ShrunkSampled(**as_dict(options), rollouts_total=run.rollouts_total),
            "targeted with a biased sampled token (test only)",
            options=TargetedOptions,
        )
'''


def test_selfcheck_fails_on_a_biased_estimator(tmp_path, capsys):
    (tmp_path / "biased.py").write_text(textwrap.dedent(BIASED_PLUGIN))
    code, out, err = run_cli(
        capsys, "selfcheck", "--plugins-dir", str(tmp_path), "--estimators", "shrunk_sampled",
        "--objectives", "reverse_kl,sampled_token", "--budgets", "16", "--seeds", "3", "--threads", "1",
        "--leaderboard-seeds", "0",
    )
    assert code == 1, out + err
    assert "FAIL shrunk_sampled (continuations=16): â is biased" in out
    assert "selfcheck failed" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--estimators", "targetd"], "unknown estimator 'targetd'"),
        (["--objectives", "reverse_kll"], "unknown objective 'reverse_kll'"),
        (["--budgets", ","], "--budgets"),
        (["--option", "oops"], "KEY=VALUE"),
        (["--seeds", "1"], "--seeds must be at least 2"),
        (["--estimators", "targeted", "--option", "no_such_option=1"], "no option 'no_such_option'"),
    ],
)
def test_selfcheck_bad_input_is_a_usage_error(capsys, argv, message):
    code, out, err = run_cli(capsys, "selfcheck", *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
