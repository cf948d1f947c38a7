"""The CLI end to end on a tiny random student, and its one-line errors."""

import json

import pytest

from conftest import make_tiny_model_dir
from gadiag_core.commands.main import main

TINY_CONFIG = """
[run]
task = "math"
teachers = "all"
questions = 2
rollouts_per_question = 2
threads = 1

[student]
max_new_tokens = 6

[estimator]
name = "targeted"
max_nodes = 2
continuations = 2
screen_epsilon = 0.0
"""


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "harness.toml"
    path.write_text(TINY_CONFIG)
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


TOY_CONFIG = """
[run]
task = "toy"
teachers = "all"
questions = 3
rollouts_per_question = 3
threads = 1

[student]
max_new_tokens = 4
"""


def test_run_end_to_end(tmp_path, toy_model_dir, capsys):
    """The default estimator, every teacher, on a student that sometimes succeeds."""
    config = tmp_path / "harness.toml"
    config.write_text(TOY_CONFIG)
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "--config", str(config), "--model", str(toy_model_dir), "--run-dir", str(run_dir))
    assert code == 0, err
    for name in ("config.toml", "rollouts.jsonl", "questions.jsonl", "tokens.jsonl", "summary.json", "tokens.parquet", "report/index.html"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rollouts"] == 9 and summary["task"] == "toy"
    assert 0 < summary["rollouts_correct"] < 9, "the toy student should sometimes succeed"
    rows = summary["rows"]
    for teacher in ("solution", "answer", "other_solution", "wrong_answer", "feedback"):
        for objective in ("reverse_kl", "sampled_token"):
            assert rows[f"{teacher}/{objective}"]["nodes"] > 0
    assert "rl_outcome" in rows and "noise_ceiling" in rows
    tokens = [json.loads(line) for line in (run_dir / "tokens.jsonl").read_text().splitlines()]
    assert tokens, "no node was scored"
    for record in tokens:
        for value in record["cos"].values():
            assert value is None or -1.0 - 1e-9 <= value <= 1.0 + 1e-9
        for row, (low, high) in record["cos_ci"].items():
            assert low <= high
    assert summary["budget"]["nodes_targeted"] == len(tokens)
    # the leaderboard on stdout names the rows and the task version
    assert "solution" in out and "rl_outcome" in out and f"v{summary['task_version']}" in out


def test_list_prints_tables(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for heading in ("tasks", "teachers", "contexts", "objectives", "samplers", "estimators"):
        assert heading in out
    assert "built-in" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--task", "maht"], "unknown task 'maht'. Did you mean 'math'?"),
        (["--teachers", "solution,anwser"], "unknown teacher 'anwser'. Did you mean 'answer'?"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--questions", "0"], "run.questions = 0 must be ≥ 1"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, expected, tiny_config, tiny_model_dir, capsys, tmp_path):
    base = ["--config", str(tiny_config), "--output-dir", str(tmp_path)]
    if "--model" not in argv:
        base += ["--model", str(tiny_model_dir)]
    code, out, err = run_cli(capsys, *base, *argv)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_config_names_the_key(tmp_path, capsys):
    bad = tmp_path / "harness.toml"
    bad.write_text("[run]\nquestionz = 3\n")
    code, _, err = run_cli(capsys, "--config", str(bad))
    assert code == 2 and "run.questionz" in err and "Did you mean 'questions'?" in err

    bad.write_text("[run]\nquestions = 'three'\n")
    code, _, err = run_cli(capsys, "--config", str(bad))
    assert code == 2 and "run.questions = 'three' must be an integer" in err

    bad.write_text("[run\nquestions = 3\n")
    code, _, err = run_cli(capsys, "--config", str(bad))
    assert code == 2 and "not valid TOML" in err


def test_cross_tokenizer_teacher_via_ids_is_refused(tmp_path, tiny_model_dir, capsys):
    """Another tokenizer goes through the bytes (tests/test_byte_teacher.py); asking
    for the ids is refused in one line."""
    other = make_tiny_model_dir(tmp_path / "other", chars="0123456789+= abc")
    config = tmp_path / "harness.toml"
    config.write_text(
        TINY_CONFIG.replace('teachers = "all"', 'teachers = "other"')
        + f'\n[teachers.other]\nmodel = "{other}"\ncontext = "solution"\nvia = "ids"\n'
    )
    code, _, err = run_cli(capsys, "--config", str(config), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path))
    assert code == 2
    assert 'uses a different tokenizer from the student, so via = "ids" cannot read' in err


def test_set_objective_option_reaches_the_objective_and_the_leaderboard(tmp_path, toy_model_dir, capsys):
    """`--set objectives.jsd.beta=0.9`: the jsd rows use β = 0.9 (config.toml and
    the leaderboard say so), and the vectors differ from β = 0.5."""
    from gadiag_core.config import load_toml

    config = tmp_path / "harness.toml"
    config.write_text(TOY_CONFIG)
    means = {}
    for beta in ("0.9", "0.1"):
        run_dir = tmp_path / f"run-{beta}"
        code, out, err = run_cli(
            capsys, "--config", str(config), "--model", str(toy_model_dir), "--run-dir", str(run_dir),
            "--teachers", "solution", "--objectives", "jsd", "--set", f"objectives.jsd.beta={beta}",
        )
        assert code == 0, err
        assert f"jsd (beta={beta})" in out
        assert load_toml(run_dir / "config.toml")["objectives"]["jsd"]["beta"] == float(beta)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["objective_options"] == {"jsd": {"beta": float(beta)}}
        means[beta] = summary["rows"]["solution/jsd"]["mean_all"]
    assert means["0.9"] is not None and means["0.1"] is not None and means["0.9"] != means["0.1"]
