"""A teacher with another tokenizer, scoring the student's bytes (DESIGN §5).

Per rollout (`prepare`): the teacher's context C (its chat template, or plain
text for a base model), then the student's generated text re-tokenized by the
teacher (its canonical tokens G, with byte offsets e_i), in one forward pass:
that gives the teacher's next-token distribution at every state C·G[:i] for
free. At student node t (byte offset o_t) the teacher state backs off to the
last boundary e_m < o_t (healing: a teacher token that would merge with the
next student token is never split), and h = B[e_m:o_t] are the healed bytes.

Per scored node (`score`, after the estimator picked the candidates):
gadiag_teachers.string_prob gives, for each candidate k,

    P(b_k | C, B_t) = M(s_m, h·b_k) / M(s_m, h)               (sampled-token objectives)
    P(k)            = (M(s_m, h·b_k) − M(s_m, h·b_k, E_k)) / M(s_m, h)   (the partition)

Off the canonical tokenization a branch costs one teacher forward (capped;
the path mass not followed is reported as `left_out`). The projected
distribution over the student's vocabulary puts P(k) on the candidates and the
rest, 1 − Σ P(k), on the other tokens in proportion to π (so r = log p − log π
is constant there and they push nothing); Σ P(k) is the covered teacher mass.

The estimator's candidates include each teacher's preferred token: here the
student token greedy longest match takes from the teacher's most likely
continuation of h at state s_m (one lookup per node, no forward).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from gadiag_core.interfaces import CandidateLogprobs, CandidateTeacher, CausalLM, ContextBuilder, ContextInputs
from gadiag_plugins.students.token_bytes import EOS_BYTES, TokenBytes, vocabulary_bytes
from gadiag_teachers.string_prob import Caps, StringScorer, score_candidates


def lm_vocabulary(lm: CausalLM, role: str) -> TokenBytes:
    """The byte strings of an LM's vocabulary (cached on the LM: 262k tokens take a second)."""
    cached = getattr(lm, "_gadiag_token_bytes", None)
    if cached is None:
        # The model's own end tokens are "the text ends"; a plain prompt's line
        # breaks (which also end its answers) keep their bytes "\n".
        eos = getattr(lm, "model_eos_ids", lm.eos_token_ids)
        cached = TokenBytes(vocabulary_bytes(lm.tokenizer, lm.vocab_size, eos, name=f"{role} {lm.name}"))
        try:
            lm._gadiag_token_bytes = cached
        except AttributeError:
            pass
    return cached


@dataclass
class _States:
    """The teacher's distributions at states (i, extra): C·G[:i]·extra.

    canonical:  [len(G)+1, Vt] log-probabilities after C·G[:i] (one forward)
    cache:      (forward keyword, key/value cache) of that forward (None: branches rerun the whole prefix)

    A branch state reuses the cache cropped to C·G[:i] and runs only its extra tokens.
    """

    lm: CausalLM
    prompt: list[int]
    canonical_ids: list[int]
    canonical: torch.Tensor
    cache: Any = None
    memo: dict = field(default_factory=dict)
    forwards: int = 0
    forwards_cached: int = 0

    def cached(self, state) -> bool:
        return not state[1] or state in self.memo

    def child(self, state, token: int):
        i, extra = state
        if not extra and i < len(self.canonical_ids) and self.canonical_ids[i] == token:
            return (i + 1, ())
        return (i, extra + (int(token),))

    def probs(self, state) -> torch.Tensor:
        i, extra = state
        if not extra:
            return self.canonical[i].double().exp()
        hit = self.memo.get(state)
        if hit is None:
            logits = self._branch_logits(i, list(extra))
            hit = torch.log_softmax(logits.double(), -1).exp()
            self.memo[state] = hit
            self.forwards += 1
        return hit


    def _branch_logits(self, i: int, extra: list[int]) -> torch.Tensor:
        """[Vt] the teacher's logits after C·G[:i]·extra."""
        if self.cache is not None:
            try:
                cache_kwarg, full = self.cache
                cache = copy.deepcopy(full)
                drop = cache.get_seq_length() - (len(self.prompt) + i)
                if drop > 0:
                    cache.crop(-drop)  # keep C·G[:i]
                model = self.lm.model
                device = next(model.parameters()).device
                with torch.no_grad():
                    out = model(input_ids=torch.tensor([extra], device=device), **{cache_kwarg: cache}, use_cache=True)
                self.forwards_cached += 1
                return out.logits[0, -1].float().cpu()
            except (AttributeError, NotImplementedError, TypeError, ValueError, RuntimeError):
                self.cache = None  # this model's cache cannot be cropped: rerun prefixes from now on
        ids = self.prompt + self.canonical_ids[:i] + extra
        return self.lm.node_logits(ids, [0])[0]  # row 0: the logits after all of ids


def canonical_forward(lm: CausalLM, prompt: list[int], canonical_ids: list[int]) -> tuple[torch.Tensor, Any]:
    """([len(G)+1, Vt] log-probabilities after C·G[:i], the key/value cache or None)."""
    model = getattr(lm, "model", None)
    if model is not None and hasattr(model, "forward"):
        try:
            device = next(model.parameters()).device
            ids = torch.tensor([prompt + canonical_ids], device=device)
            kwargs = {"use_cache": True}
            if getattr(lm, "_logits_to_keep", False):
                kwargs["logits_to_keep"] = len(canonical_ids) + 1
            with torch.no_grad():
                out = model(input_ids=ids, **kwargs)
            logits = out.logits[0, -(len(canonical_ids) + 1):].float().cpu()
            # transformers 5 names the cache `cache`, 4.x `past_key_values`
            name = "cache" if out.get("cache") is not None else "past_key_values"
            cache = out.get(name)
            return torch.log_softmax(logits, -1), None if cache is None or not hasattr(cache, "crop") else (name, cache)
        except (TypeError, ValueError):
            pass
    logits = lm.node_logits(prompt, canonical_ids + [canonical_ids[-1] if canonical_ids else 0])
    return torch.log_softmax(logits.float(), -1), None


@dataclass
class BytePass:
    """One rollout prepared for scoring: offsets, states, and the preferred tokens.

    offsets:    [T+1] byte offset o_t of every student node (o_T = end)
    boundaries: [len(G)+1] byte offsets e_i of the teacher's canonical tokens
    text:       the generated bytes B (without the end sentinel)
    preferred:  [T] the teacher's preferred student token at every node
    """

    states: _States
    scorer: StringScorer
    offsets: list[int]
    boundaries: list[int]
    text: bytes
    preferred: torch.Tensor


class ByteTeacher(CandidateTeacher):
    """Another model (any byte-level tokenizer) shown a context, scoring the student's bytes."""

    def __init__(self, name: str, lm: CausalLM, context: ContextBuilder, student: CausalLM, caps: Caps = Caps(), description: str = ""):
        self.name = name
        self.lm = lm
        self.context = context
        self.student = student
        self.caps = caps
        self.description = description or f"{lm.name} shown '{context.name}' (byte path)"
        self.teacher_vocab = lm_vocabulary(lm, "teacher")
        self.student_vocab = lm_vocabulary(student, "student")
        self._extensions: dict[int, tuple] = {}
        # "The answer ends": the student's end tokens (a plain-text student's line
        # breaks among them) are the teacher's end event: its end token, or a
        # line break for a teacher prompted in plain text.
        self.student_end = [int(i) for i in student.eos_token_ids]
        self.student_model_end = set(int(i) for i in getattr(student, "model_eos_ids", student.eos_token_ids))
        self.end_bytes = b"\n" if getattr(lm, "prompt_format", "chat") == "plain" else EOS_BYTES
        self.info = {"external": True, "model": lm.name, "tokenizer": tokenizer_name(lm), "via": "bytes", "vocab": lm.vocab_size}

    # -- alignment -------------------------------------------------------------

    def _teacher_tokens(self, text: bytes) -> list[int]:
        """The teacher's canonical tokens of the generated text; a text its
        tokenizer does not reproduce byte for byte (a split UTF-8 character)
        falls back to one token per byte."""
        ids = self.lm.tokenizer(text.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if b"".join(self.teacher_vocab.bytes_of[i] or b"" for i in ids) == text:
            return [int(i) for i in ids]
        out = []
        for byte in text:
            ids_of = self.teacher_vocab.ids_of.get(bytes([byte]))
            if not ids_of:
                raise ValueError(f"teacher {self.lm.name!r} has no token for byte {byte:#x}")
            out.append(ids_of[0])
        return out

    def _boundary(self, p: BytePass, t: int) -> tuple[int, bytes]:
        """(m, h): the healed teacher state C·G[:m] and the bytes h = B[e_m:o_t] (e_m < o_t unless o_t = 0)."""
        o = p.offsets[t]
        m = max(i for i, e in enumerate(p.boundaries) if e < o) if o > 0 else 0
        return m, p.text[p.boundaries[m]:o]

    def _preferred(self, p: BytePass, t: int, gen_token: int) -> int:
        m, h = self._boundary(p, t)
        state = (m, ())
        probs = p.states.probs(state)
        vocab = self.teacher_vocab
        lo, hi = vocab.prefix_range(h)
        if hi <= lo:
            return gen_token
        ids = torch.tensor(vocab.order[lo:hi])
        best = int(ids[probs[ids].argmax()])
        rest = vocab.bytes_of[best][len(h):]
        if not rest:  # the teacher's best token ends exactly at the node: look one token on
            child = p.states.child(state, best)
            if not p.states.cached(child):
                return gen_token
            nxt = p.states.probs(child)
            with_bytes = torch.tensor(vocab.order)
            rest = vocab.bytes_of[int(with_bytes[nxt[with_bytes].argmax()])]
        if rest.startswith(self.end_bytes):
            return self.student_end[0] if self.student_end else gen_token
        token = self.student_vocab.longest_prefix_token(rest)
        return gen_token if token is None else token

    # -- the Teacher interface ---------------------------------------------------

    def prepare(self, inputs: ContextInputs, generated_ids: list[int]) -> Optional[BytePass]:
        messages = self.context.build(inputs)
        if messages is None:
            return None
        prompt = self.lm.encode_messages(messages)
        pieces = [self._text_bytes(i) for i in generated_ids]
        text = b"".join(pieces)
        # A plain-text teacher's prompt ends with "A:": the answer follows a space,
        # which a chat student does not write. The space joins the teacher's side
        # (healing then conditions on it at node 0).
        lead = b" " if getattr(self.lm, "prompt_format", "chat") == "plain" and text[:1] not in (b"", b" ", b"\n") else b""
        text = lead + text
        offsets = [len(lead)]
        for piece in pieces:
            offsets.append(offsets[-1] + len(piece))
        canonical_ids = self._teacher_tokens(text)
        boundaries = [0]
        for i in canonical_ids:
            boundaries.append(boundaries[-1] + len(self.teacher_vocab.bytes_of[i] or b""))
        # One forward: the distribution after C·G[:i] for i = 0 … len(G), and its cache.
        canonical, cache = canonical_forward(self.lm, list(prompt), canonical_ids)  # [len(G)+1, Vt]
        states = _States(self.lm, list(prompt), canonical_ids, canonical, cache)
        p = BytePass(states, StringScorer(self.teacher_vocab, states, self.caps), offsets, boundaries, text, torch.empty(0))
        p.preferred = torch.tensor([self._preferred(p, t, g) for t, g in enumerate(generated_ids)], dtype=torch.long)
        return p

    def _text_bytes(self, token: int) -> bytes:
        """The bytes `token` adds to the generated text: none for an end token;
        for a plain-text student's line-break token (it ends the answer), what
        comes before its line break."""
        b = self.student_vocab.bytes_of[token] or b""
        if token in self.student_model_end or b == EOS_BYTES:
            return b""
        if token in self.student_end and b"\n" in b:
            return b[: b.index(b"\n")]
        return b

    def candidate_bytes(self, token: int) -> Optional[bytes]:
        """The event the teacher scores for student token `token`: its bytes; for an
        end token, the teacher's end event (after the bytes a line-break end adds)."""
        if token in self.student_end or self.student_vocab.bytes_of[token] == EOS_BYTES:
            return self._text_bytes(token) + self.end_bytes
        return self.student_vocab.bytes_of[token]

    def _student_extensions(self, token: int) -> tuple:
        hit = self._extensions.get(token)
        if hit is None:
            b = self.student_vocab.bytes_of[token]
            hit = self.student_vocab.minimal_extensions(b) if b and b != EOS_BYTES and token not in self.student_end else ()
            self._extensions[token] = hit
        return hit

    def score(self, prepared: BytePass, nodes: list[int], candidates: list[torch.Tensor], sampled: torch.Tensor, student_logprobs: torch.Tensor) -> CandidateLogprobs:
        n, width = student_logprobs.shape
        out = torch.empty(n, width, dtype=torch.float32)
        sampled_lp = torch.empty(n)
        covered = torch.empty(n)
        left_out = torch.empty(n)
        before = prepared.states.forwards
        for row, (t, cand) in enumerate(zip(nodes, candidates)):
            ids = [int(k) for k in cand.tolist()]
            y = int(sampled[row])
            if y not in ids:
                ids.append(y)
            m, h = self._boundary(prepared, t)
            scores = score_candidates(
                prepared.scorer, (m, ()), h, [self.candidate_bytes(k) for k in ids], [self._student_extensions(k) for k in ids]
            )
            # Candidates that are one event for this teacher (a chat student's "\n" and its
            # end token, for a plain-text teacher whose answers end at a line break):
            # the mass goes to one of them, end tokens first, so the partition stays one.
            part = scores.partition.clone()
            owner: dict = {}
            for j in sorted(range(len(ids)), key=lambda j: ids[j] not in self.student_end):
                event = self.candidate_bytes(ids[j])
                if event in owner:
                    part[j] = 0.0
                else:
                    owner[event] = j
            out[row] = project(part, torch.tensor(ids), student_logprobs[row])
            scores.partition = part
            # floored like the partition: a token the teacher cannot write gets log FLOOR, not −inf
            sampled_lp[row] = max(float(scores.string_logprob[ids.index(y)]), math.log(FLOOR))
            covered[row] = float(scores.partition.sum())
            left_out[row] = scores.left_out
        return CandidateLogprobs(out, sampled_lp, covered, left_out, prepared.states.forwards - before)


FLOOR = 1e-10  # the least probability a candidate or the rest gets (log 0 would make r infinite)


def project(partition: torch.Tensor, candidates: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """[V] log p over the student's vocabulary from the teacher's partition on the candidates.

    partition:         [C] P(k) of the candidate tokens (float64)
    candidates:        [C] their ids
    student_logprobs:  [V] log π

    p_k = P(k) on the candidates; the rest R = 1 − Σ P(k) on the others in
    proportion to π: p_j = R π_j / Σ_{i∉C} π_i. Floors at FLOOR, renormalised."""
    part = partition.double().clamp_min(FLOOR)
    rest = max(1.0 - float(part.sum()), FLOOR)
    lpi = student_logprobs.double()
    mask = torch.ones_like(lpi, dtype=torch.bool)
    mask[candidates] = False
    out = torch.empty_like(lpi)
    if bool(mask.any()):
        out[mask] = lpi[mask] - torch.logsumexp(lpi[mask], 0) + torch.log(torch.tensor(rest, dtype=torch.float64))
        total = float(part.sum()) + rest
    else:
        total = float(part.sum())
    out[candidates] = part.log()
    return (out - torch.log(torch.tensor(total, dtype=torch.float64))).float()


def tokenizer_name(lm: CausalLM) -> str:
    """'GemmaTokenizer, 262144 tokens': the tokenizer's class and size (its path is often a cache folder)."""
    tok = lm.tokenizer
    return f"{type(tok).__name__.removesuffix('Fast')}, {len(tok)} tokens"
