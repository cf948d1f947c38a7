"""Teacher types: teachers defined in harness.toml as ``[teachers.NAME]``.

    [teachers.big]
    type = "model"                 # the default
    model = "HuggingFaceTB/SmolLM2-360M-Instruct"
    context = "solution"

`model`: another causal LM shown a context. Loaded at the start of every
command (light); the model is loaded only when the run builds the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gadiag_core import hookimpl
from gadiag_core.options import option

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelTeacherOptions:
    model: str = option(help="alias, Hugging Face id, local model folder or .gguf file")
    context: str = option("solution", "the context builder whose prompt the teacher sees (see `gadiag-harness list context`)")
    dtype: Optional[str] = option(None, "the teacher's dtype (none: the student's)", choices=DTYPES)
    device: Optional[str] = option(None, "torch device (none: CPU)")


def model_teacher(options: ModelTeacherOptions, run):
    """Another model shown `options.context`; it must share the student's tokenizer."""
    from gadiag_core.errors import UsageError
    from gadiag_plugins.students.hf import load_lm, same_tokenizer
    from gadiag_teachers.model_teacher import ContextTeacher

    context = run.context(options.context)
    lm = load_lm(options.model, dtype=options.dtype or run.dtype, temperature=1.0, device=options.device)
    if not same_tokenizer(lm, run.student):
        raise UsageError(
            f"teacher model {options.model!r} uses a different tokenizer from the student: "
            "cross-tokenizer teachers are not supported yet; pick a teacher of the student's model family"
        )
    return ContextTeacher("model", lm, context, f"{options.model} shown '{options.context}'")


@hookimpl
def register_teacher_types(register):
    register("model", model_teacher, "another causal LM shown a context ([teachers.NAME] model = …, context = …)", options=ModelTeacherOptions)
