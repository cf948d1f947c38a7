"""Table-driven: bad input of every kind gets exit code 2 and one line naming it."""

import pytest

from gadiag_core.commands.main import main

BASE = """
[run]
questions = 1
rollouts_per_question = 1
threads = 1
"""

# (id, extra CLI args, extra config text, expected fragment of the message)
CASES = [
    ("unknown-task", ["--task", "maht"], "", "unknown task 'maht'. Did you mean 'math'?"),
    ("unknown-teacher", ["--teachers", "solutoin"], "", "unknown teacher 'solutoin'. Did you mean 'solution'?"),
    ("empty-teachers", ["--teachers", ","], "", "no teacher given"),
    ("unknown-objective", ["--objectives", "reverse_k"], "", "unknown objective 'reverse_k'"),
    ("unknown-estimator", ["--estimator", "targetted"], "", "unknown estimator 'targetted'. Did you mean 'targeted'?"),
    ("unknown-sampler", ["--sampler", "batchd"], "", "unknown sampler 'batchd'. Did you mean 'batched'?"),
    ("missing-model-dir", ["--model", "/nonexistent/model"], "", "/nonexistent/model"),
    ("missing-gguf", ["--model", "/nonexistent/model.gguf"], "", "/nonexistent/model.gguf"),
    ("questions-zero", ["--questions", "0"], "", "run.questions = 0 is out of range"),
    ("questions-not-int", ["--questions", "abc"], "", "--questions: invalid int value: 'abc'"),
    ("rollouts-zero", ["--rollouts", "0"], "", "run.rollouts_per_question = 0 is out of range"),
    ("negative-temperature", ["--temperature", "-1"], "", "student.temperature = -1.0 is out of range"),
    ("max-new-tokens-zero", ["--max-new-tokens", "0"], "", "student.max_new_tokens = 0 is out of range"),
    ("unknown-flag", ["--bogus-flag"], "", "unrecognized arguments: --bogus-flag"),
    ("missing-config", ["--config", "/nonexistent/harness.toml"], None, "config file /nonexistent/harness.toml not found"),
    ("unknown-table", [], "[runn]\nseed = 1\n", "unknown table [runn] in config. Did you mean 'run'?"),
    ("unknown-key", [], "[student]\ntemprature = 1.0\n", "unknown key student.temprature in config. Did you mean 'temperature'?"),
    ("wrong-type", [], "[student]\ntemperature = 'hot'\n", "student.temperature must be a number"),
    ("malformed-toml", [], "[student\n", "is not valid TOML"),
    ("bad-dtype", [], "[student]\ndtype = 'int8'\n", "student.dtype = 'int8'"),
    ("bad-space", [], "[run]\nspace = 'weights'\n", "'weights'"),
    ("bad-teachers-type", [], "[run]\nteachers = 5\n", "run.teachers must be 'all'"),
    ("unknown-student-backend", [], "[student]\nbackend = 'vllm'\n", "unknown student 'vllm'"),
    ("estimator-option-unknown", [], "[estimator]\nname = 'targeted'\nbogus = 1\n", "estimator 'targeted' has no option 'bogus'"),
    ("estimator-option-range", [], "[estimator]\nname = 'targeted'\ncontinuations = 1\n", "continuations must be >= 2"),
    ("sampler-option-range", [], "[sampler]\nname = 'batched'\nbatch_size = 0\n", "batch_size must be >= 1"),
    ("task-bad-level", [], "[task]\nlevels = ['L9']\n", "unknown level 'L9'"),
    ("task-unknown-option", [], "[task]\nlevles = ['L1']\n", "'levles'"),
    ("teacher-without-model", [], "[teachers.big]\ncontext = 'solution'\n", "[teachers.big] needs model"),
    ("teacher-unknown-context", [], "[teachers.big]\nmodel = 'x'\ncontext = 'soluton'\n", "unknown context 'soluton'. Did you mean 'solution'?"),
    ("plugins-dir-missing", ["--plugins-dir", "/nonexistent/plugins"], "", "--plugins-dir /nonexistent/plugins: not a directory"),
]


@pytest.mark.parametrize("argv, config_text, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input(argv, config_text, expected, tmp_path, tiny_model_dir, capsys):
    base = ["--output-dir", str(tmp_path), "--model", str(tiny_model_dir)]
    if config_text is not None:
        config = tmp_path / "harness.toml"
        config.write_text(BASE + "\n" + config_text if not config_text.startswith("[run]") else config_text)
        base += ["--config", str(config)]
    code = main(base + argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert expected in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_at_least_25_cases():
    assert len(CASES) >= 25
