"""The README kept in step with the code (as datasette's tests/test_docs.py does):
every hook, every option of every built-in plugin with its real default, every
config key, and every command-line flag."""

from pathlib import Path

import pytest

from gadiag_core import hookspecs
from gadiag_core.commands import docs
from gadiag_core.registry import KINDS, load_registry

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_reference_is_generated_from_the_code(registry):
    current = docs.spliced(README, docs.reference(registry))
    assert current == README, "README.md's reference is out of date: run `gadiag-harness docs --write README.md`"


def test_reference_lists_every_option_with_its_default(registry):
    from gadiag_core.options import describe_options

    block = README.split(docs.START, 1)[1].split(docs.END, 1)[0]
    for kind in KINDS:
        for name in registry.names(kind):
            entry = registry.get(kind, name)
            for option, _, default, _, _ in describe_options(entry.options):
                assert f"| `{option}` | " in block and f"`{default}`".replace("|", "\\|") in block, (kind, name, option)


def test_every_hook_is_documented():
    hooks = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert len(hooks) == len(KINDS)
    for hook in hooks:
        assert f"`{hook}`" in README, hook
        assert getattr(hookspecs, hook).__doc__.strip(), hook


def _usage_block() -> str:
    return README.split("## Usage", 1)[1].split("```text", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("command", ["run", "list", "report", "show", "selfcheck", "docs"])
def test_every_flag_is_in_the_usage_block(command):
    import importlib

    from gadiag_core.commands.main import COMMANDS

    parser = importlib.import_module(COMMANDS[command]).parser()
    usage = _usage_block()
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--") and s != "--help"]
    assert flags, command
    for flag in flags:
        assert flag in usage, f"{command} {flag} missing from README's usage block"


def test_the_check_fails_on_a_stale_readme(registry):
    stale = README.replace("| `run.questions` | int | `8` |", "| `run.questions` | int | `9` |")
    assert stale != README
    assert docs.spliced(stale, docs.reference(registry)) != stale
