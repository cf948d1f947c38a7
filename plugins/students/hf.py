"""A Hugging Face causal LM as a gadiag Student (and the model behind model teachers)."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from gadiag_core.errors import UsageError
from gadiag_core.interfaces import Student


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


class HFCausalLM(Student):
    """A transformers causal LM and its tokenizer.

    model:        a ``*ForCausalLM`` module (any device, any dtype)
    tokenizer:    its tokenizer, with a chat template
    name:         how records and messages name it
    temperature:  the policy is softmax(logits / temperature)

    Tensors returned are on CPU in float32 whatever the model's device and dtype.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = "", temperature: float = 1.0):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise UsageError(f"temperature must be a positive number, got {temperature!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "model")
        self.temperature = float(temperature)
        ids = _as_id_list(getattr(tokenizer, "eos_token_id", None))
        generation_config = getattr(model, "generation_config", None)
        ids += _as_id_list(getattr(generation_config, "eos_token_id", None))
        self._eos = list(dict.fromkeys(ids))
        try:
            self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self._logits_to_keep = False

    def __repr__(self) -> str:
        return f"HFCausalLM(name={self.name!r}, vocab_size={self.vocab_size}, temperature={self.temperature})"

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    @property
    def vocab_size(self) -> int:
        config = self.model.config
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        return int(config.vocab_size)

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def encode_messages(self, messages: list[dict]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise UsageError(f"model {self.name!r} has no chat template: use an instruct/chat model")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding (return_dict=True by default); 4.x a list.
        if hasattr(out, "keys") and "input_ids" in out:
            out = out["input_ids"]
        if isinstance(out, torch.Tensor):
            out = out.tolist()
        if out and isinstance(out[0], (list, tuple)):
            if len(out) != 1:
                raise ValueError("encode_messages expects one conversation")
            out = out[0]
        return [int(i) for i in out]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def node_logits(self, prompt_ids: list[int], generated_ids: list[int]) -> torch.Tensor:
        prompt_ids = [int(i) for i in prompt_ids]
        generated_ids = [int(i) for i in generated_ids]
        T = len(generated_ids)
        if T == 0:
            return torch.zeros(0, self.vocab_size, dtype=torch.float32)
        if not prompt_ids:
            raise ValueError("node_logits needs a non-empty prompt")
        # Row t is the logits at position len(prompt) + t - 1; the last generated
        # token is never an input.
        ids = torch.tensor([prompt_ids + generated_ids[:-1]], dtype=torch.long, device=self.device)
        kwargs = {"use_cache": False}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = T
        with torch.no_grad():
            logits = self.model(input_ids=ids, **kwargs).logits[0]
        return logits[-T:].to(dtype=torch.float32, device="cpu")


def _tokenizer_of(x):
    return getattr(x, "tokenizer", x)


def _special_signature(tok) -> tuple:
    """What must agree besides the vocabulary: the bos/eos tokens, and which
    added tokens are special (kept whole when encoding, dropped when decoding).

    pad/unk and the `additional_special_tokens` list are left out: they differ
    between copies of one tokenizer (a GGUF conversion and the hub original)
    without changing what any id means."""
    named = tuple(None if getattr(tok, attr, None) is None else str(getattr(tok, attr)) for attr in ("bos_token", "eos_token"))
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    special = frozenset((int(i), str(t.content)) for i, t in decoder.items() if getattr(t, "special", False))
    return named, special


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers (or CausalLMs) give every id the same token, and
    agree on bos/eos and on which added tokens are special, so a teacher can
    read the student's token ids as they are.

    The models' logits widths may still differ (padded vocabularies)."""
    ta, tb = _tokenizer_of(a), _tokenizer_of(b)
    if ta is tb:
        return True
    try:
        if ta.get_vocab() != tb.get_vocab():
            return False
    except AttributeError:
        return False
    return _special_signature(ta) == _special_signature(tb)


def load_lm(spec: str, dtype="float32", temperature: float = 1.0, name: Optional[str] = None, device=None) -> HFCausalLM:
    """Load a model spec (alias, .gguf file, folder, hub id) as an HFCausalLM."""
    from gadiag_plugins.students.loading import load_model

    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
        raise UsageError(f"temperature must be a positive number, got {temperature!r}")
    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    return HFCausalLM(model, tokenizer, name=name or spec, temperature=temperature)
