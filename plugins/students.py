"""The built-in student back-end: a Hugging Face causal LM."""

from __future__ import annotations

from gadiag_core import hookimpl
from gadiag_core.errors import UsageError


def hf_student(model, temperature=1.0, dtype="float32", device=None, **options):
    """A Hugging Face causal LM: an alias, a hub id, a local folder or a .gguf file.

    device: where to put the model (default CPU), e.g. "cuda"."""
    if options:
        raise UsageError(
            f"student 'hf' has no option(s) {', '.join(repr(k) for k in sorted(options))}: "
            f"it takes model, temperature, dtype and device"
        )
    from gadiag_core.lm import load_lm

    return load_lm(model, dtype=dtype, temperature=temperature, device=device)


@hookimpl
def register_students(register):
    register("hf", hf_student, "Hugging Face causal LM (hub id, local dir or GGUF)")
