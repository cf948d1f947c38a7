"""Self-distillation teachers: the student's own model, one per built-in context.

`--teachers solution` means "the student, shown the reference solution".
"""

from gadiag_core import hookimpl
from gadiag_teachers.contexts import BUILT_IN


def self_teacher_factory(context_name: str, description: str):
    def factory(options, run):
        from gadiag_teachers.model_teacher import ContextTeacher

        return ContextTeacher(context_name, run.student, run.context(context_name), f"student + {description}")

    return factory


@hookimpl
def register_teachers(register):
    for cls in BUILT_IN:
        register(cls.name, self_teacher_factory(cls.name, cls.description), f"the student itself; context: {cls.description}")
