"""Every hook a gadiag plugin can implement.

A plugin is a module (or object) with functions decorated by
``gadiag_core.hookimpl`` whose names are the hooks below. Plugins are found
through the ``gadiag`` entry-point group (built-ins use it too) and, for loose
files, through ``--plugins-dir DIR``. A function named like a hook that is not
one fails at start-up (``PluginManager.check_pending``).

The ``register_*`` hooks are all called once, when the registry is built (at
the start of every command), each with a ``register`` callback::

    register(name, factory, description="")

``name`` is what users type (``--task NAME``, ``--teachers A,B``); the core
rejects a name already taken and names both plugins. ``factory`` is called
later, only for the components a run uses, with the keyword arguments listed
under each hook; it returns an instance of the interface in
``gadiag_core.interfaces``.
"""

import pluggy

hookspec = pluggy.HookspecMarker("gadiag")


@hookspec
def register_tasks(register):
    """Register tasks. Called once when the registry is built.

    ``factory(**options) -> Task``; ``options`` are the keys of the
    ``[task]`` table of harness.toml (for example ``levels``)."""


@hookspec
def register_students(register):
    """Register student back-ends. Called once when the registry is built.

    ``factory(model, temperature, dtype, **options) -> Student``; ``model`` is
    an alias, a Hugging Face id, a local directory or a ``.gguf`` file."""


@hookspec
def register_contexts(register):
    """Register teacher context builders. Called once when the registry is built.

    ``factory() -> ContextBuilder``. A context turns (problem, rollouts) into
    the chat messages a teacher sees before the student's generated tokens."""


@hookspec
def register_teachers(register):
    """Register teachers. Called once when the registry is built.

    ``factory(student, contexts) -> Teacher``: ``student`` is the loaded
    Student (self-distillation teachers reuse its model), ``contexts`` maps
    context names to factories. Teachers defined in harness.toml
    (``[teachers.NAME]``) are added by the core and need no hook."""


@hookspec
def register_teacher_types(register):
    """Register teacher types: kinds of teacher that harness.toml instantiates
    by name. Called once when the registry is built.

    ``[teachers.NAME] type = "TYPE"`` (default ``model``) with the other keys
    as the type's options builds one teacher called NAME:
    ``factory(options, run) -> Teacher``."""


@hookspec
def register_objectives(register):
    """Register distillation objectives. Called once when the registry is built.

    ``factory(**options) -> Objective``."""


@hookspec
def register_samplers(register):
    """Register rollout samplers. Called once when the registry is built.

    ``factory(**options) -> RolloutSampler``; ``options`` are the keys of the
    ``[sampler]`` table other than ``name``."""


@hookspec
def register_estimators(register):
    """Register ideal-gradient estimators. Called once when the registry is built.

    ``factory(**options) -> GradientEstimator``; ``options`` are the keys of
    the ``[estimator]`` table other than ``name``."""
