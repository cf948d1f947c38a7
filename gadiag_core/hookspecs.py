"""Every hook a gadiag plugin can implement.

A plugin is a module (or object) with functions decorated by
``gadiag_core.hookimpl`` whose names are the hooks below. Plugins are found
through the ``gadiag`` entry-point group (built-ins use it too) and, for loose
files, through ``--plugins-dir DIR``. A function named like a hook that is not
one fails at start-up (``PluginManager.check_pending``).

The ``register_*`` hooks are all called once, when the registry is built (at
the start of every command), each with a ``register`` callback::

    register(name, factory, description="", options=None)

``name`` is what users type (``--task NAME``, ``--teachers A,B``); the core
rejects a name already taken and names both plugins. ``options`` is a frozen
dataclass of ``gadiag_core.options.option`` fields (type, default, help,
range): the registry checks the user's settings against it ("did you mean",
types, ranges) before anything loads, and ``gadiag-harness list KIND NAME``
prints it. ``factory`` is called later, only for the components a run uses,
always as::

    factory(options, run)

with ``options`` the checked dataclass instance (an empty one when the plugin
declares none) and ``run`` the ``gadiag_core.interfaces.RunContext`` (seed,
rollouts_total, max_new_tokens, temperature, dtype, the loaded student, and
``run.context(name)`` to build a context). It returns an instance of the
interface in ``gadiag_core.interfaces`` named under each hook. A factory that
raises ValueError reports an out-of-range setting (shown as one line naming
the plugin); one that returns None is refused.

Keep the module that registers light: import torch and model code inside the
factory, so ``gadiag-harness list`` and ``--help`` stay fast.
"""

import pluggy

hookspec = pluggy.HookspecMarker("gadiag")


@hookspec
def register_tasks(register):
    """Register tasks (``Task``). Called once when the registry is built.

    Options come from the ``[task]`` table of harness.toml (e.g. ``levels``)."""


@hookspec
def register_students(register):
    """Register student back-ends (``Student``). Called once when the registry is built.

    Options are the ``[student]`` keys other than backend, temperature and
    max_new_tokens (e.g. ``model``, ``dtype``); the factory reads the
    temperature from ``run.temperature``."""


@hookspec
def register_contexts(register):
    """Register teacher context builders (``ContextBuilder``). Called once when
    the registry is built.

    A context turns (problem, rollouts) into the messages a teacher sees before
    the student's generated tokens; teachers build theirs with ``run.context(name)``."""


@hookspec
def register_teachers(register):
    """Register teachers (``Teacher``) that need no configuration. Called once
    when the registry is built.

    ``run.student`` is the loaded student (self-distillation teachers reuse its
    model). Teachers that need settings are teacher types (below)."""


@hookspec
def register_teacher_types(register):
    """Register teacher types (``Teacher``): kinds of teacher that harness.toml
    instantiates by name. Called once when the registry is built.

    ``[teachers.NAME] type = "TYPE"`` (default ``model``) with the other keys
    as the type's options builds one teacher called NAME."""


@hookspec
def register_objectives(register):
    """Register distillation objectives (``Objective``). Called once when the
    registry is built.

    Options come from ``[objectives.NAME]`` (e.g. ``[objectives.jsd] beta = 0.9``).
    An objective that also defines ``loss(...)`` is checked against autograd
    by ``gadiag-harness selfcheck``."""


@hookspec
def register_samplers(register):
    """Register rollout samplers (``RolloutSampler``). Called once when the
    registry is built.

    Options are the keys of the ``[sampler]`` table other than ``name``."""


@hookspec
def register_estimators(register):
    """Register ideal-gradient estimators (``GradientEstimator``). Called once
    when the registry is built.

    Options are the keys of the ``[estimator]`` table other than ``name``; run
    budgets are shared over ``run.rollouts_total`` rollouts."""


@hookspec
def register_environments(register):
    """Register exact environments: a student small enough that every
    continuation can be enumerated, so Q, a* and every cosine are known
    exactly. Called once when the registry is built; ``gadiag-harness selfcheck
    --environment NAME`` certifies estimators and objectives on one.

    The factory returns a builder ``build(problems, rollouts_per_problem, seed,
    max_new_tokens, task) -> environment`` with the attributes
    gadiag_core.certify reads (``rollouts``, ``nodes``, ``student``,
    ``teachers``, ``max_new_tokens``, exact values per node)."""
