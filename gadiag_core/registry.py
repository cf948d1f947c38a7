"""The plugin manager and the registry of named components.

Plugins come from the ``gadiag`` entry-point group (built-ins included) and
from ``--plugins-dir`` folders of loose ``.py`` files. Each ``register_*`` hook
is called once per plugin with a ``register`` callback bound to that plugin, so
a duplicate name can be reported with both culprits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pluggy

from gadiag_core import hookspecs
from gadiag_core.errors import EnvironmentFailure, UsageError, unknown_name
from gadiag_core.options import NoOptions, build_options

# kind -> the hook that registers it
KINDS = {
    "task": "register_tasks",
    "student": "register_students",
    "context": "register_contexts",
    "teacher": "register_teachers",
    "teacher_type": "register_teacher_types",
    "objective": "register_objectives",
    "sampler": "register_samplers",
    "estimator": "register_estimators",
    "environment": "register_environments",
}


@dataclass(frozen=True)
class Entry:
    """One registered component: what users type, how to build it, who gave it."""

    kind: str
    name: str
    factory: Callable
    description: str
    source: str
    options: type = NoOptions  # the plugin's options dataclass (gadiag_core.options)

    @property
    def owner(self) -> str:
        """How messages name it: "estimator 'targeted' (built-in (estimators))"."""
        return f"{self.kind} {self.name!r} ({self.source})"


class Registry:
    """Named components by kind, built from the plugin manager's hooks."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, name: str, factory: Callable, description: str, source: str, options=None) -> None:
        if not isinstance(name, str) or not name or "," in name or "/" in name or name.strip() != name:
            raise UsageError(f"plugin {source} registered a {kind} with an invalid name {name!r}")
        if not callable(factory):
            raise UsageError(f"plugin {source} registered {kind} {name!r} with a factory that is not callable: {factory!r}")
        if options is not None and not dataclasses.is_dataclass(options):
            raise UsageError(f"plugin {source} registered {kind} {name!r} with options={options!r}: pass a dataclass of option() fields")
        taken = self.entries[kind].get(name)
        if taken is not None:
            raise UsageError(
                f"{kind} {name!r} is registered twice: by {taken.source} and by {source}. "
                f"Uninstall or rename one of them."
            )
        self.entries[kind][name] = Entry(kind, name, factory, description, source, options or NoOptions)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self.entries[kind][name]
        except KeyError:
            raise unknown_name(kind, name, self.entries[kind]) from None

    def options(self, kind: str, name: str, raw: dict | None = None):
        """The named plugin's options instance from a raw table (checked)."""
        entry = self.get(kind, name)
        return build_options(entry.options, dict(raw or {}), f"{kind} {name!r}")

    def create(self, kind: str, name: str, run=None, **raw):
        """Build the named component: `factory(options, run)`.

        raw:  the user's option values (checked against the plugin's options
              dataclass: unknown keys, types and ranges fail with a UsageError
              naming the plugin and the option)
        run:  the RunContext (run-level facts: seed, rollouts_total, the loaded
              student, …); a default one when None
        A factory's ValueError is an out-of-range setting: it becomes a UsageError
        naming the plugin; any other exception (a plugin bug, a damaged model
        file) becomes a one-line UsageError naming the plugin and the error."""
        from gadiag_core.interfaces import RunContext  # light: dataclasses only at import

        entry = self.get(kind, name)
        options = self.options(kind, name, raw)
        if run is None:
            run = RunContext(registry=self)
        elif run.registry is None:
            run.registry = self
        try:
            built = entry.factory(options, run)
        except (UsageError, EnvironmentFailure, KeyboardInterrupt, MemoryError):
            raise
        except ValueError as exc:
            raise UsageError(f"{kind} {name!r}: {exc}") from None
        except Exception as exc:  # the plugin's own failure: one line naming it, no traceback
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise UsageError(f"{entry.owner} failed to build: {type(exc).__name__}{': ' + reason if reason else ''}") from None
        if built is None:
            raise UsageError(f"{entry.owner}: its factory returned None instead of a {kind}")
        return built

    def resolve(self, kind: str, spec) -> list[str]:
        """Names from 'all', 'a,b' or a list; unknown names raise with suggestions."""
        if isinstance(spec, str):
            spec = [part.strip() for part in spec.split(",") if part.strip()]
        if list(spec) == ["all"]:
            return self.names(kind)
        if not spec:
            raise UsageError(f"no {kind} given: name one or more, or 'all'. Available: {', '.join(self.names(kind))}")
        for name in spec:
            self.get(kind, name)
        return list(dict.fromkeys(spec))


def _source_names(pm: pluggy.PluginManager) -> dict[int, str]:
    """id(plugin) -> where it came from, for messages and `list`."""
    sources = {}
    for plugin, dist in pm.list_plugin_distinfo():
        project = getattr(dist, "project_name", None) or dist.metadata["name"]
        label = "built-in" if project == "gadiag" else f"package {project}"
        sources[id(plugin)] = f"{label} ({pm.get_name(plugin)})"
    for name, plugin in pm.list_name_plugin():
        sources.setdefault(id(plugin), name)
    return sources


def load_plugin_file(pm: pluggy.PluginManager, path: Path) -> None:
    """Import one loose plugin file and register it under 'file:PATH'."""
    module_name = f"gadiag_local_plugins.{path.stem}_{abs(hash(str(path.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: say which one broke
        sys.modules.pop(module_name, None)
        raise UsageError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from None
    register_plugin(pm, module, f"file:{path}")


def register_plugin(pm: pluggy.PluginManager, plugin, name: str) -> None:
    """pm.register with pluggy's validation errors turned into UsageErrors."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise UsageError(f"plugin {name}: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"plugin {name} could not be registered: {exc}") from None


def plugin_manager(plugins_dirs: Iterable[str | Path] = (), extra_plugins: Iterable[tuple[str, object]] = ()) -> pluggy.PluginManager:
    """A plugin manager with the hook specs, entry-point plugins, loose files
    from `plugins_dirs`, and `extra_plugins` (name, object) pairs."""
    pm = pluggy.PluginManager("gadiag")
    pm.add_hookspecs(hookspecs)
    try:
        pm.load_setuptools_entrypoints("gadiag")
    except Exception as exc:  # an installed plugin package that fails to import
        raise UsageError(
            f"an installed gadiag plugin failed to load: {type(exc).__name__}: {exc} "
            "(reinstall or uninstall the package that provides it)"
        ) from None
    for directory in plugins_dirs:
        directory = Path(directory)
        if not directory.is_dir():
            raise UsageError(f"--plugins-dir {directory}: not a directory")
        for path in sorted(directory.glob("*.py")):
            if not path.name.startswith("_"):
                load_plugin_file(pm, path)
    for name, plugin in extra_plugins:
        register_plugin(pm, plugin, name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise UsageError(f"{exc} (a misspelled hook name? see gadiag_core/hookspecs.py)") from None
    return pm


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every register_* hook, one plugin at a time, into a Registry."""
    registry = Registry()
    sources = _source_names(pm)
    for kind, hook_name in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            source = sources.get(id(impl.plugin), impl.plugin_name)

            def register(name, factory, description="", options=None, _kind=kind, _source=source):
                registry.add(_kind, name, factory, description, _source, options)

            impl.function(register=register)
    return registry


def load_registry(plugins_dirs: Iterable[str | Path] = (), extra_plugins=()) -> Registry:
    """The registry a command uses."""
    return build_registry(plugin_manager(plugins_dirs, extra_plugins))
