"""Teacher types: teachers defined in harness.toml as ``[teachers.NAME]``.

    [teachers.big]
    type = "model"                 # the default
    model = "HuggingFaceTB/SmolLM2-360M-Instruct"
    context = "solution"

`model`: another causal LM shown a context. Loaded at the start of every
command (light); the model is loaded only when the run builds the teacher.

A teacher sharing the student's tokenizer is read off at the student's token
ids (exact). Any other teacher with a byte-level tokenizer scores the
student's bytes (gadiag_teachers.byte_teacher, DESIGN §5): sampled-token
objectives get the string probability of the sampled token, full-distribution
objectives the teacher's mass on each node's candidates (the rest spread ∝ π).
`via = "bytes"` forces the byte path on a same-tokenizer teacher (to check
it against the ids).

    [teachers.gemma]
    model = "gemma3-270m"          # a base model: prompted in plain text
    context = "solution"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gadiag_core import hookimpl
from gadiag_core.interfaces import ContextBuilder
from gadiag_core.options import option

DTYPES = ("float32", "bfloat16", "float16")
VIAS = ("auto", "ids", "bytes")


@dataclass(frozen=True)
class ModelTeacherOptions:
    model: str = option(help="alias, Hugging Face id, local model folder or .gguf file")
    context: str = option("solution", "the context builder whose prompt the teacher sees (see `gadiag-harness list context`)")
    dtype: Optional[str] = option(None, "the teacher's dtype (none: the student's)", choices=DTYPES)
    device: Optional[str] = option(None, "torch device (none: CPU)")
    via: str = option("auto", "ids: read the student's token ids (same tokenizer only); bytes: score the student's bytes; auto: ids when the tokenizers agree", choices=VIAS)
    prompt_format: str = option("auto", "chat, plain ('Q: …\\nA:' text for base models) or auto (chat when the tokenizer has a template)", choices=("auto", "chat", "plain"))
    max_forwards: int = option(4, "byte path: teacher forwards per scored node off the canonical tokenization", min=0, max=1000)
    max_depth: int = option(6, "byte path: branch levels of the prefix marginal", min=1, max=64)
    min_mass: float = option(1e-3, "byte path: least path mass worth a teacher forward (the rest is reported as left out)", min=0.0, max=1.0)


def model_teacher(options: ModelTeacherOptions, run):
    """Another model shown `options.context`: through the ids (same tokenizer) or the bytes."""
    from gadiag_core.errors import UsageError
    from gadiag_plugins.students.hf import load_lm, same_tokenizer
    from gadiag_teachers.model_teacher import ContextTeacher

    context = run.context(options.context)
    lm = load_lm(options.model, dtype=options.dtype or run.dtype, temperature=1.0, device=options.device, prompt_format=options.prompt_format)
    same = same_tokenizer(lm, run.student)
    if options.via == "ids" and not same:
        raise UsageError(
            f"teacher model {options.model!r} uses a different tokenizer from the student, so via = \"ids\" cannot read "
            "the student's token ids: use via = \"auto\" or \"bytes\""
        )
    if same and options.via != "bytes":
        teacher = ContextTeacher("model", lm, context, f"{options.model} shown '{options.context}'")
        teacher.info = {"external": True, "model": options.model, "tokenizer": "student's", "via": "ids", "vocab": lm.vocab_size}
        return teacher
    from gadiag_teachers.byte_teacher import ByteTeacher
    from gadiag_teachers.string_prob import Caps

    caps = Caps(max_depth=options.max_depth, max_forwards=options.max_forwards, min_mass=options.min_mass)
    teacher = ByteTeacher("model", lm, context, run.student, caps, f"{options.model} shown '{options.context}' (byte path)")
    teacher.info["model"] = options.model
    return teacher


class QuestionContext(ContextBuilder):
    """No privileged information: the student's own prompt (an external model's
    plain opinion, the baseline of its privileged-context rows)."""

    name = "question"
    description = "no privileged information: the student's own prompt (for external model teachers)"

    def build(self, inputs):
        return [dict(m) for m in inputs.student_messages]


def _question_context(options, run):
    return QuestionContext()


@hookimpl
def register_contexts(register):
    register(QuestionContext.name, _question_context, QuestionContext.description)


@hookimpl
def register_teacher_types(register):
    register("model", model_teacher, "another causal LM shown a context ([teachers.NAME] model = …, context = …)", options=ModelTeacherOptions)
