"""The components of a run, built from a checked RunConfig through the registry.

    task, student, teachers, objectives, sampler, estimator

Names and options were checked by gadiag_core.config.validate before this
runs, so what can fail here is loading (a model that is not there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gadiag_core.config import RunConfig
from gadiag_core.interfaces import (
    GradientEstimator,
    Objective,
    Problem,
    RolloutSampler,
    RunContext,
    Student,
    Task,
    Teacher,
)
from gadiag_core.options import as_dict
from gadiag_core.registry import Registry


@dataclass
class Components:
    task: Task
    student: Student
    teachers: dict[str, Teacher]
    objectives: dict[str, Objective]
    sampler: RolloutSampler
    estimator: GradientEstimator


def run_context(config: RunConfig, registry: Registry) -> RunContext:
    """The run-level facts every factory receives (the student is set once loaded)."""
    return RunContext(
        seed=config.run.seed,
        rollouts_total=config.rollouts_total,
        max_new_tokens=config.student.max_new_tokens,
        temperature=config.student.temperature,
        dtype=getattr(config.student_options, "dtype", "float32") or "float32",
        registry=registry,
    )


def build_components(config: RunConfig, registry: Registry, task: Task | None = None, teachers: bool = True) -> Components:
    """Every component of the run, built through the registry (names and
    options were checked by config.validate; models load here). `task`: one
    already built (the run loads its problems before the models). `teachers`
    False: none loaded (a Ray driver: its actors hold the teachers)."""
    run = run_context(config, registry)
    if task is None:
        task = registry.create("task", config.task.name, run, **config.task.option_dict())
    sampler = registry.create("sampler", config.sampler.name, run, **config.sampler.option_dict())
    estimator = registry.create("estimator", config.estimator.name, run, **config.estimator.option_dict())
    objectives = {name: registry.create("objective", name, run, **choice.option_dict()) for name, choice in config.objectives.items()}
    run.student = registry.create("student", config.student.backend, run, **_set(config.student_options))
    if getattr(task, "depends_on_student", False):
        # Its defaults follow the student (the math levels of a base model prompted
        # in plain text): build it again now that the student is known.
        task = registry.create("task", config.task.name, run, **config.task.option_dict())
    loaded = {}
    for name in config.run.teachers if teachers else ():
        if name in config.teachers:
            choice = config.teachers[name]
            teacher = registry.create("teacher_type", choice.name, run, **_set(choice.options))
            teacher.name = name
        else:
            teacher = registry.create("teacher", name, run)
        loaded[name] = teacher
    return Components(task, run.student, loaded, objectives, sampler, estimator)


def _set(options) -> dict:
    """An options instance as the keyword arguments that rebuild it."""
    return {k: v for k, v in as_dict(options).items()}


@dataclass
class Rollout:
    """One student rollout, verified: what every later stage works on."""

    problem: Problem
    index: int
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str
    correct: bool
    messages: list[dict] = field(default_factory=list)
