"""The generic teacher: a causal LM shown a context builder's prompt.

Self-distillation teachers are the student's own model with a privileged
context; external teachers (``[teachers.NAME]`` in harness.toml) are other
models with any context. Both share the student's tokenizer: the teacher scores
the student's tokens, so a different vocabulary would need a token alignment
that gadiag does not do yet.
"""

from __future__ import annotations

from typing import Optional


from gadiag_core.interfaces import CausalLM, ContextBuilder, ContextInputs, PromptedTeacher


class ContextTeacher(PromptedTeacher):
    def __init__(self, name: str, lm: CausalLM, context: ContextBuilder, description: str = ""):
        self.name = name
        self.lm = lm
        self.context = context
        self.description = description or f"{lm.name} shown context '{context.name}'"

    def prompt_ids(self, inputs: ContextInputs) -> Optional[list[int]]:
        messages = self.context.build(inputs)
        return None if messages is None else self.lm.encode_messages(messages)
