"""Registry and plugin-manager behaviour: built-ins, duplicates, unknown names,
loose plugin files, misspelled hooks, and an inline plugin added and removed."""

import textwrap

import pytest

from gadiag_core import hookimpl
from gadiag_core.errors import UsageError
from gadiag_core.registry import KINDS, build_registry, load_registry, plugin_manager


def test_builtins_register_every_kind_through_entry_points():
    registry = load_registry()
    assert "math" in registry.names("task")
    assert {"solution", "answer", "other_solution", "wrong_answer", "self_success", "feedback"} <= set(
        registry.names("teacher")
    )
    assert {"reverse_kl", "sampled_token"} <= set(registry.names("objective"))
    assert "targeted" in registry.names("estimator")
    assert "batched" in registry.names("sampler")
    assert "hf" in registry.names("student")
    for kind in KINDS:
        for name in registry.names(kind):
            assert registry.get(kind, name).source.startswith("built-in"), (kind, name)


def test_unknown_name_suggests_and_lists():
    registry = load_registry()
    with pytest.raises(UsageError) as info:
        registry.get("teacher", "solutoin")
    message = str(info.value)
    assert "unknown teacher 'solutoin'" in message
    assert "Did you mean 'solution'?" in message
    assert "feedback" in message  # the list of what exists


def test_resolve_all_and_list():
    registry = load_registry()
    assert registry.resolve("teacher", "all") == registry.names("teacher")
    assert registry.resolve("teacher", "answer, solution") == ["answer", "solution"]
    with pytest.raises(UsageError, match="Did you mean 'answer'"):
        registry.resolve("teacher", "answer,anwser")


class DuplicateTask:
    @hookimpl
    def register_tasks(self, register):
        register("math", lambda **kw: None, "a second math")


def test_duplicate_name_names_both_plugins():
    with pytest.raises(UsageError) as info:
        load_registry(extra_plugins=[("my-duplicate", DuplicateTask())])
    message = str(info.value)
    assert "task 'math' is registered twice" in message
    assert "built-in" in message and "my-duplicate" in message


def test_inline_plugin_registered_then_removed():
    class Inline:
        @hookimpl
        def register_objectives(self, register):
            register("zero", lambda: None, "always zero")

    pm = plugin_manager()
    plugin = Inline()
    pm.register(plugin, name="inline")
    try:
        registry = build_registry(pm)
        assert registry.get("objective", "zero").source == "inline"
    finally:
        pm.unregister(plugin)
    assert "zero" not in build_registry(pm).names("objective")


def test_plugins_dir_loads_loose_files(tmp_path):
    (tmp_path / "my_task.py").write_text(
        textwrap.dedent(
            """
            from gadiag_core import hookimpl

            @hookimpl
            def register_tasks(register):
                register("loose_task", lambda **kw: None, "from a loose file")
            """
        )
    )
    registry = load_registry([tmp_path])
    entry = registry.get("task", "loose_task")
    assert entry.source == f"file:{tmp_path / 'my_task.py'}"


def test_misspelled_hook_fails_loudly(tmp_path):
    (tmp_path / "typo.py").write_text(
        "from gadiag_core import hookimpl\n\n@hookimpl\ndef register_task(register):\n    pass\n"
    )
    with pytest.raises(UsageError, match="register_task"):
        load_registry([tmp_path])


def test_plugin_file_that_fails_to_import_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UsageError, match="broken.py failed to import: RuntimeError: boom"):
        load_registry([tmp_path])


def test_missing_plugins_dir(tmp_path):
    with pytest.raises(UsageError, match="not a directory"):
        load_registry([tmp_path / "nope"])
