"""The built-in student back-end `hf`: a Hugging Face causal LM.

    loading.py   finding and loading models: aliases, GGUF files (converted once
                 and cached), local folders, hub ids
    hf.py        HFCausalLM, the Student the rest of gadiag talks to

Loaded at the start of every command; transformers and torch are imported
only when a model is built. The ``[student]`` table of harness.toml holds the
run's keys (backend, temperature, max_new_tokens) and this back-end's options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gadiag_core import hookimpl
from gadiag_core.options import option

# Exactly the dtypes the loader accepts (loading.torch_dtype).
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class HFOptions:
    model: str = option("smollm2-135m-instruct", "alias, Hugging Face id, local model folder or .gguf file")
    dtype: str = option("float32", "weights and activations", choices=DTYPES)
    device: Optional[str] = option(None, "torch device, e.g. cuda (none: CPU)")
    prompt_format: str = option("auto", "chat: the chat template; plain: 'Q: …\\nA: …' few-shot text for base models (one-line answers); auto: chat when the tokenizer has a template", choices=("auto", "chat", "plain"))


def hf_student(options: HFOptions, run):
    """Load the model as the run's student, at the run's temperature."""
    from gadiag_plugins.students.hf import load_lm

    return load_lm(options.model, dtype=options.dtype, temperature=run.temperature, device=options.device, prompt_format=options.prompt_format)


@hookimpl
def register_students(register):
    register("hf", hf_student, "Hugging Face causal LM (alias, hub id, local folder or GGUF)", options=HFOptions)
