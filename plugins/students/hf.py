"""A Hugging Face causal LM as a gadiag Student (and the model behind model teachers)."""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
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


def cache_keyword(model) -> str:
    """The forward() keyword of the KV cache: `cache` from transformers 5.x on,
    `past_key_values` before (still accepted, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (recent transformers
    causal LMs do)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


PROMPT_FORMATS = ("auto", "chat", "plain")

# Prompts whose key/value cache node_logits keeps (least recently used out):
# a question's prompt is read by each of its rollouts, and a context's by each
# rollout it scores, so reading only the generated tokens after a cached prompt
# spares most of a teacher forward (3-4x faster for a 160-token prompt and 40
# generated tokens on SmolLM2-135M). Through the hand-written decoder the
# cache holds blocks of PROMPT_BLOCK tokens (an entry per block, keyed by the
# ids up to its end: the contexts of one question share their first blocks).
# 64 blocks are ~94 MB of SmolLM2 keys/values. 0 turns the cache off
# (benchmarks/pipeline.py --prompt-cache-off measures what it saves).
PROMPT_CACHE_ENTRIES = 64
PROMPT_BLOCK = 32


def render_plain(messages: list[dict]) -> str:
    """Chat messages as a plain-text few-shot prompt for a base model:

        Q: <user>\nA: <assistant>\n\n … Q: <last user>\nA:

    (a system message comes first, as its text and a blank line). The
    completion is one line: see HFCausalLM's end tokens."""
    parts = []
    for message in messages:
        role, content = message.get("role"), str(message.get("content", "")).strip()
        if role == "system":
            parts.append(f"{content}\n\n")
        elif role == "assistant":
            parts.append(f"A: {content}\n\n")
        else:
            parts.append(f"Q: {content}\n")
    return "".join(parts) + "A:"


class HFCausalLM(Student):
    """A transformers causal LM and its tokenizer.

    model:          a ``*ForCausalLM`` module (any device, any dtype)
    tokenizer:      its tokenizer
    name:           how records and messages name it
    temperature:    the policy is softmax(logits / temperature)
    prompt_format:  "chat" (the tokenizer's chat template), "plain" (render_plain,
                    for base models) or "auto": chat when the tokenizer has a
                    chat template. With plain prompts the answer is one line, so
                    every token containing a line break ends a completion as
                    EOS does (it joins eos_token_ids).

    Tensors returned are on CPU in float32 whatever the model's device and dtype.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = "", temperature: float = 1.0, prompt_format: str = "auto"):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise UsageError(f"temperature must be a positive number, got {temperature!r}")
        if prompt_format not in PROMPT_FORMATS:
            raise UsageError(f"unknown prompt_format {prompt_format!r}: use one of {', '.join(PROMPT_FORMATS)}")
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if prompt_format == "auto":
            prompt_format = "chat" if has_template else "plain"
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "model")
        self.temperature = float(temperature)
        ids = _as_id_list(getattr(tokenizer, "eos_token_id", None))
        generation_config = getattr(model, "generation_config", None)
        ids += _as_id_list(getattr(generation_config, "eos_token_id", None))
        self.prompt_format = prompt_format
        self.model_eos_ids = list(dict.fromkeys(ids))  # the model's own end tokens (without plain prompts' line breaks)
        if prompt_format == "plain":
            ids += self._line_break_ids()
        self._eos = list(dict.fromkeys(ids))
        self._logits_to_keep = keeps_logits(model)
        # prompt ids[:-1] -> its key/value cache (see node_logits)
        self._prompt_caches: OrderedDict = OrderedDict()
        self._arch = None  # the hand-written decoder, False where there is none (_decoder)

    def _line_break_ids(self) -> list[int]:
        """Ids of the tokens whose text contains a line break (plain prompts' answer end)."""
        from gadiag_plugins.students.token_bytes import token_text_to_bytes, tokenizer_kind

        kind = tokenizer_kind(self.tokenizer)
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        texts = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return [i for i, t in enumerate(texts) if t is not None and i not in special and b"\n" in token_text_to_bytes(t, kind)]

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
        if self.prompt_format == "plain":
            return [int(i) for i in self.tokenizer(render_plain(messages), add_special_tokens=True)["input_ids"]]
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise UsageError(f"model {self.name!r} has no chat template: set prompt_format = \"plain\" (or \"auto\") for a base model")
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
        # token is never an input. Through the decoder the prompt's whole blocks
        # come from the block cache (_prompt_blocks). Otherwise the prompt but
        # its last token comes from the cache (computed once per prompt); the
        # forward reads [last prompt token] + generated[:-1] after a copy of it
        # (the copy keeps the cached one clean for the next reader). Same values
        # as one forward of the whole sequence up to float rounding (~3e-5 on
        # the logits), and the same whatever order prompts are read in.
        arch = self._decoder()
        if arch is not None:
            return self._node_logits_rows(arch, [prompt_ids], generated_ids)[0]
        with torch.no_grad():
            cache = self._prompt_cache(prompt_ids[:-1]) if len(prompt_ids) > 1 else None
            ids = torch.tensor([prompt_ids[-1:] + generated_ids[:-1]] if cache is not None else [prompt_ids + generated_ids[:-1]], dtype=torch.long, device=self.device)
            kwargs = {"use_cache": cache is not None}
            if cache is not None:
                kwargs[cache_keyword(self.model)] = copy.deepcopy(cache)
            if self._logits_to_keep:
                kwargs["logits_to_keep"] = T
            logits = self.model(input_ids=ids, **kwargs).logits[0]
        return logits[-T:].to(dtype=torch.float32, device="cpu")

    def _decoder(self):
        """The sampler's hand-written decoder (plugins/sampling/llama_decoder.py)
        for Llama/Qwen-style models: prepacked weights and fused q/k/v and MLP
        make node_logits 1.4x faster than the model's own forward on CPU
        (`python benchmarks/node_logits.py`). None for other models."""
        if self._arch is False:
            return None
        from gadiag_plugins.sampling.llama_decoder import _Arch, prepared_pack

        if self._arch is None:
            self._arch = _Arch.of(self.model) or False
            if self._arch is False:
                return None
        self._arch.prepare(self.model, prepared_pack(self.model))  # cheap once prepared
        return self._arch

    def node_logits_many(self, prompts: list[list[int]], generated_ids: list[int]) -> list[torch.Tensor]:
        """node_logits of one rollout under several prompts. Through the
        decoder (Llama/Qwen-style models) it is one pass over all of them
        (`_node_logits_rows`); otherwise one node_logits call each."""
        arch = self._decoder()
        if arch is None or not generated_ids:
            return [self.node_logits(prompt, generated_ids) for prompt in prompts]
        prompts = [[int(i) for i in prompt] for prompt in prompts]
        if not all(prompts):
            raise ValueError("node_logits needs a non-empty prompt")
        return self._node_logits_rows(arch, prompts, [int(i) for i in generated_ids])

    def _node_logits_rows(self, arch, prompts: list[list[int]], generated_ids: list[int]) -> list[torch.Tensor]:
        """node_logits through the decoder, one row per prompt: each prompt's
        whole blocks of PROMPT_BLOCK tokens (but its last token) come from the
        block cache; its row reads the rest of the prompt and generated[:-1]
        after them, and keeps the logits of its last T positions."""
        T = len(generated_ids)
        pasts, rows = [], []
        with torch.no_grad():
            for prompt in prompts:
                start = (len(prompt) - 1) // PROMPT_BLOCK * PROMPT_BLOCK if PROMPT_CACHE_ENTRIES > 0 else 0
                pasts.append(self._prompt_blocks(prompt[:start], arch) if start else None)
                rows.append(prompt[start:] + generated_ids[:-1])
            width = max(len(row) for row in rows)
            ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long, device=arch.device)  # padding: never attended by a real position
            keep_rows = torch.arange(len(rows), device=arch.device).repeat_interleave(T)
            keep_cols = torch.cat([torch.arange(len(row) - T, len(row)) for row in rows]).to(arch.device)
            logits = arch.prefill_rows(ids, [len(row) for row in rows], pasts, keep_rows, keep_cols)
        return list(logits.to(dtype=torch.float32, device="cpu").split(T))

    def _prompt_blocks(self, ids: list[int], arch):
        """Per-layer keys/values [1, KV, n, d] of `ids` (n = len(ids), a
        multiple of PROMPT_BLOCK), built block by block: block j is encoded
        in one pass after blocks 0 … j − 1 and cached (its own PROMPT_BLOCK
        positions) under the ids up to its end. Every block is always
        computed the same way (the same passes whatever was cached before),
        so the values never depend on the order prompts are read in, and a
        prompt that shares whole blocks with an earlier one (the chat
        template and the question, for most contexts of a question) encodes
        only the blocks after them."""
        empty = torch.zeros(0, dtype=torch.long, device=arch.device)
        blocks, past, joined = [], None, 0  # past: the first `joined` blocks, concatenated
        for stop in range(PROMPT_BLOCK, len(ids) + 1, PROMPT_BLOCK):
            key = (True, tuple(ids[:stop]))
            block = self._prompt_caches.get(key)
            if block is not None:
                self._prompt_caches.move_to_end(key)
            else:
                if joined < len(blocks):
                    past, joined = _concat(blocks), len(blocks)
                tokens = torch.tensor([ids[stop - PROMPT_BLOCK : stop]], dtype=torch.long, device=arch.device)
                block, _ = arch.prefill(tokens, empty, empty, past)
                self._prompt_caches[key] = block
                past, joined = _concat([past, block]) if past is not None else block, joined + 1
            blocks.append(block)
        while len(self._prompt_caches) > PROMPT_CACHE_ENTRIES:
            self._prompt_caches.popitem(last=False)
        return past if joined == len(blocks) else _concat(blocks)

    def _prompt_cache(self, ids: list[int]):
        """The model's key/value cache of `ids` (a prompt without its last
        token), from the PROMPT_CACHE_ENTRIES most recently used ones or
        computed now; None when the model returns none (models without the
        hand-written decoder; the decoder caches blocks: _prompt_blocks)."""
        if PROMPT_CACHE_ENTRIES <= 0:  # off: one forward of the whole sequence
            return None
        key = (False, tuple(ids))
        cache = self._prompt_caches.get(key)
        if cache is not None:
            self._prompt_caches.move_to_end(key)
            return cache
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        kwargs = {"use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        cache = returned_cache(self.model(input_ids=tokens, **kwargs))
        if cache is None:
            return None
        self._prompt_caches[key] = cache
        while len(self._prompt_caches) > PROMPT_CACHE_ENTRIES:
            self._prompt_caches.popitem(last=False)
        return cache


def _concat(parts: list) -> list:
    """Per-layer (keys, values) of consecutive spans, joined along positions."""
    return [(torch.cat([part[l][0] for part in parts], dim=-2), torch.cat([part[l][1] for part in parts], dim=-2)) for l in range(len(parts[0]))]


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


def load_lm(spec: str, dtype="float32", temperature: float = 1.0, name: Optional[str] = None, device=None, prompt_format: str = "auto") -> HFCausalLM:
    """Load a model spec (alias, .gguf file, folder, hub id) as an HFCausalLM."""
    from gadiag_plugins.students.loading import load_model

    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
        raise UsageError(f"temperature must be a positive number, got {temperature!r}")
    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    return HFCausalLM(model, tokenizer, name=name or spec, temperature=temperature, prompt_format=prompt_format)
