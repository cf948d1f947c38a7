"""The generic teacher: a causal LM shown a context builder's prompt.

Self-distillation teachers are the student's own model with a privileged
context; external teachers (``[teachers.NAME]`` in harness.toml) are other
models with any context. Both share the student's tokenizer: the teacher scores
the student's tokens, so a different vocabulary would need a token alignment
that gadiag does not do yet.
"""

from __future__ import annotations

from typing import Optional

import torch

from gadiag_core.interfaces import CausalLM, ContextBuilder, ContextInputs, Teacher


class ContextTeacher(Teacher):
    def __init__(self, name: str, lm: CausalLM, context: ContextBuilder, description: str = ""):
        self.name = name
        self.lm = lm
        self.context = context
        self.description = description or f"{lm.name} shown context '{context.name}'"

    def node_logprobs(self, inputs: ContextInputs, generated_ids: list[int]) -> Optional[torch.Tensor]:
        messages = self.context.build(inputs)
        if messages is None:
            return None
        prompt_ids = self.lm.encode_messages(messages)
        logits = self.lm.node_logits(prompt_ids, generated_ids)  # [T, V]
        return torch.log_softmax(logits.float(), dim=-1)
