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
    ("questions-zero", ["--questions", "0"], "", "run.questions = 0 must be ≥ 1"),
    ("questions-not-int", ["--questions", "abc"], "", "run.questions = 'abc' must be an integer"),
    ("rollouts-zero", ["--rollouts", "0"], "", "run.rollouts_per_question = 0 must be ≥ 1"),
    ("negative-temperature", ["--temperature", "-1"], "", "student.temperature = -1 must be > 0"),
    ("max-new-tokens-zero", ["--max-new-tokens", "0"], "", "student.max_new_tokens = 0 must be ≥ 1"),
    ("unknown-flag", ["--bogus-flag"], "", "unrecognized arguments: --bogus-flag"),
    ("missing-config", ["--config", "/nonexistent/harness.toml"], None, "config file /nonexistent/harness.toml not found"),
    ("unknown-table", [], "[runn]\nseed = 1\n", "unknown table [runn] in config. Did you mean 'run'?"),
    ("unknown-key", [], "[student]\ntemprature = 1.0\n", "unknown key student.temprature in config. Did you mean 'temperature'?"),
    ("wrong-type", [], "[student]\ntemperature = 'hot'\n", "student.temperature = 'hot' must be a number"),
    ("malformed-toml", [], "[student\n", "is not valid TOML"),
    ("bad-dtype", [], "[student]\ndtype = 'int8'\n", "student.dtype = 'int8' must be one of float32, bfloat16, float16"),
    ("bad-space", [], "[run]\nspace = 'weights'\n", "'weights'"),
    ("bad-teachers-type", [], "[run]\nteachers = 5\n", "run.teachers = 5 must be a list of str"),
    ("unknown-student-backend", [], "[student]\nbackend = 'vllm'\n", "unknown student 'vllm'"),
    ("estimator-option-unknown", [], "[estimator]\nname = 'targeted'\nbogus = 1\n", "estimator 'targeted' has no option 'bogus'"),
    ("estimator-option-range", [], "[estimator]\nname = 'targeted'\ncontinuations = 1\n", "estimator 'targeted': option continuations = 1 must be ≥ 2"),
    ("sampler-option-range", [], "[sampler]\nname = 'batched'\nbatch_size = 0\n", "sampler 'batched': option batch_size = 0 must be ≥ 1"),
    ("task-bad-level", [], "[task]\nlevels = ['L9']\n", "unknown level 'L9'"),
    ("task-unknown-option", [], "[task]\nlevles = ['L1']\n", "'levles'"),
    ("teacher-without-model", [], "[teachers.big]\ncontext = 'solution'\n", "[teachers.big] (type 'model') needs option 'model'"),
    ("teacher-unknown-context", [], "[teachers.big]\nmodel = 'x'\ncontext = 'soluton'\n", "unknown context 'soluton'. Did you mean 'solution'?"),
    ("temperature-zero", ["--temperature", "0"], "", "student.temperature = 0 must be > 0"),
    ("temperature-nan", ["--temperature", "nan"], "", "student.temperature = nan must be a finite number"),
    ("temperature-inf", ["--temperature", "inf"], "", "student.temperature = inf must be a finite number"),
    ("seed-huge", ["--seed", "99999999999999999999999"], "", "run.seed = 99999999999999999999999 is too large"),
    ("threads-huge", ["--threads", "100000"], "", "run.threads = 100000 must be ≤ 1024"),
    ("max-new-tokens-huge", ["--max-new-tokens", "1000000000"], "", "student.max_new_tokens = 1000000000 must be ≤ 65536"),
    ("estimator-option-type", [], "[estimator]\nname = 'targeted'\nscreen_epsilon = 'abc'\n", "option screen_epsilon = 'abc' must be a number"),
    ("estimator-option-nan", [], "[estimator]\nname = 'targeted'\nmass_threshold = nan\n", "option mass_threshold = nan must be a finite number"),
    ("estimator-option-negative", [], "[estimator]\nname = 'targeted'\nmass_threshold = -1.0\n", "option mass_threshold = -1.0 must be ≥ 0"),
    ("estimator-option-typo", ["--set", "estimator.screen_epsilo=0.1"], "", "has no option 'screen_epsilo'. Did you mean 'screen_epsilon'?"),
    ("objective-option-range", ["--set", "objectives.jsd.beta=2"], "", "objective 'jsd': option beta = 2 must be ≤ 1"),
    ("objective-option-typo", ["--set", "objectives.jsd.bta=0.5"], "", "objective 'jsd' has no option 'bta'. Did you mean 'beta'?"),
    ("objective-table-unknown", [], "[objectives.jds]\nbeta = 0.5\n", "unknown objective 'jds'. Did you mean 'jsd'?"),
    ("set-malformed", ["--set", "estimator.continuations"], "", "--set 'estimator.continuations' must look like table.key=value"),
    ("sampler-option-type", [], "[sampler]\nname = 'prefix'\nbatch_size = 'big'\n", "option batch_size = 'big' must be an integer"),
    ("teacher-unknown-type", [], "[teachers.big]\ntype = 'modle'\nmodel = 'x'\n", "unknown teacher_type 'modle'. Did you mean 'model'?"),
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
