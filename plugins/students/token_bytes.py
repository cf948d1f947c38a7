"""Every token of a tokenizer as the byte string it stands for (DESIGN §5).

A teacher with another tokenizer scores the student's *bytes*, so both
vocabularies must map each id to a fixed byte string. Three tokenizer kinds
are read:

    byte-level BPE (GPT-2 style, SmolLM2)   token text in the bytes-to-unicode alphabet
    SentencePiece with byte fallback (Gemma) "▁" for a space, "<0xNN>" for a raw byte
    plain (a WordLevel/char vocabulary)     token text as UTF-8

and the result is checked by a round trip on a probe text (spaces, newlines,
digits, punctuation): a tokenizer that normalises or drops text
fails with a UsageError saying what is needed.

Special tokens have no bytes (None), except end-of-sequence tokens, which all
map to the same sentinel `EOS_BYTES`, so "the text ends here" is one event in
both vocabularies.

`TokenBytes` keeps the byte strings sorted, so the tokens whose bytes start
with a given prefix are one contiguous range (`prefix_range`), and a
distribution's mass over that range is a difference of prefix sums.
"""

from __future__ import annotations

import bisect
import json
import re
from typing import Iterable, Optional, Sequence

from gadiag_core.errors import UsageError

# Both models' end-of-sequence tokens: "the text ends". Never produced by text
# (NUL and 0xFF bytes do not occur in the generated text of these tasks).
EOS_BYTES = b"\x00\xff<eos>\xff\x00"

PROBE_TEXT = "Q: What is 47 + 8?\nA: 47 + 8 = 55.  The answer is 55.\n\n"

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _component_types(node) -> set[str]:
    """Every "type" named in a tokenizers JSON component (decoders nest)."""
    out: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            out.add(node["type"])
        for value in node.values():
            out |= _component_types(value)
    elif isinstance(node, list):
        for value in node:
            out |= _component_types(value)
    return out


def tokenizer_kind(tokenizer) -> str:
    """"byte_level", "sentencepiece" or "plain" from the tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError(
            f"tokenizer {type(tokenizer).__name__} has no fast (Rust) backend: a teacher with another tokenizer "
            "needs a fast tokenizer whose tokens map to bytes (byte-level BPE or SentencePiece with byte fallback)"
        )
    spec = json.loads(backend.to_str())
    types = _component_types(spec.get("decoder")) | _component_types(spec.get("pre_tokenizer"))
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or "ByteFallback" in types or "Replace" in types:
        return "sentencepiece"
    return "plain"


def token_text_to_bytes(text: str, kind: str) -> bytes:
    """The bytes of one (non-special) token's vocabulary text."""
    if kind == "byte_level":
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in text)
        except KeyError:
            return text.encode("utf-8")  # an added (non-special) token stored as plain text
    if kind == "sentencepiece":
        match = _BYTE_TOKEN.match(text)
        if match:
            return bytes([int(match.group(1), 16)])
        return text.replace("\u2581", " ").encode("utf-8")
    return text.encode("utf-8")


def vocabulary_bytes(tokenizer, width: int, eos_ids: Iterable[int], name: str = "model") -> list[Optional[bytes]]:
    """[width] the bytes of every id (None: special or beyond the tokenizer);
    eos ids map to EOS_BYTES. Checked by a round trip on PROBE_TEXT."""
    kind = tokenizer_kind(tokenizer)
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(i))
    eos = set(int(i) for i in eos_ids)
    size = len(tokenizer)
    texts = tokenizer.convert_ids_to_tokens(list(range(min(size, width))))
    out: list[Optional[bytes]] = [None] * width
    for i, text in enumerate(texts):
        if i in eos:
            out[i] = EOS_BYTES
        elif i in special or text is None:
            out[i] = None
        else:
            out[i] = token_text_to_bytes(text, kind)
    for i in eos:
        if 0 <= i < width:
            out[i] = EOS_BYTES
    # The probe's characters that the vocabulary has (small test vocabularies lack letters).
    unk = getattr(tokenizer, "unk_token_id", None)
    probe = "".join(c for c in PROBE_TEXT if unk is None or unk not in tokenizer(c, add_special_tokens=False)["input_ids"])
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    joined = b"".join(out[i] or b"" for i in ids if i < width)
    if not probe or joined != probe.encode("utf-8"):
        raise UsageError(
            f"the tokenizer of {name!r} has no byte-level decoding (its tokens of a probe text join to "
            f"{joined[:40]!r}…, not the text): a teacher with another tokenizer needs every token to stand for "
            "fixed bytes (byte-level BPE, or SentencePiece with byte fallback and no normalisation)"
        )
    return out


class TokenBytes:
    """A vocabulary as byte strings, sorted for prefix-range queries.

    bytes_of:  [V] bytes of each id (None: never part of text)
    order:     ids with bytes, sorted by their bytes
    """

    def __init__(self, bytes_of: Sequence[Optional[bytes]]):
        self.bytes_of = list(bytes_of)
        self.width = len(self.bytes_of)
        pairs = sorted((b, i) for i, b in enumerate(self.bytes_of) if b)
        self.sorted_bytes = [b for b, _ in pairs]
        self.order = [i for _, i in pairs]
        self.max_len = max((len(b) for b in self.sorted_bytes), default=0)
        self.ids_of: dict[bytes, list[int]] = {}
        for b, i in pairs:
            self.ids_of.setdefault(b, []).append(i)
        self._ceiling = b"\xff" * (self.max_len + 1)

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """(lo, hi): positions in `order` of the tokens whose bytes start with `prefix`."""
        lo = bisect.bisect_left(self.sorted_bytes, prefix)
        hi = bisect.bisect_right(self.sorted_bytes, prefix + self._ceiling, lo)
        return lo, hi

    def with_prefix(self, prefix: bytes) -> list[int]:
        lo, hi = self.prefix_range(prefix)
        return self.order[lo:hi]

    def longest_prefix_token(self, text: bytes) -> Optional[int]:
        """The id of the longest token whose bytes are a prefix of `text` (greedy match)."""
        for end in range(min(len(text), self.max_len), 0, -1):
            ids = self.ids_of.get(text[:end])
            if ids:
                return ids[0]
        return None

    def minimal_extensions(self, stem: bytes) -> tuple[bytes, ...]:
        """The suffixes e ≠ b"" such that stem·e is a token, keeping only the
        minimal ones (no kept suffix is a prefix of another): the event "the
        text continues into a longer token than `stem`" is the disjoint union
        of "starts with stem·e" over them."""
        kept: list[bytes] = []
        for b in self.sorted_bytes[slice(*self.prefix_range(stem))]:
            if len(b) == len(stem):
                continue
            suffix = b[len(stem):]
            if kept and suffix.startswith(kept[-1]):
                continue  # sorted order: every extension of a kept suffix follows it
            kept.append(suffix)
        return tuple(kept)
