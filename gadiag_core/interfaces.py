"""The interfaces plugins implement, and the plain data passed between them.

Read top to bottom this is the data flow of one rollout (DESIGN §3):

    Task.problems -> Problem
    Task.student_messages -> Student.encode_messages -> prompt ids
    RolloutSampler.sample -> generated ids ; Task.verify -> reward
    Student.node_logits           -> z(u_t)            [T, V]
    Teacher.node_logprobs         -> log p_T(.|u'_t)   [T, V]
      (CandidateTeacher, another tokenizer: prepare -> preferred tokens [T] now,
       score -> log p on the scored nodes' candidate sets after the estimator)
    GradientEstimator.estimate    -> a*(u_t) on the targeted nodes (sparse)
    Objective.vector              -> b(u_t)            [T, V]
    alignment                     -> cos(a*, b) per token / question / teacher

Every tensor is on CPU in float32 unless said otherwise. "Node t" is the
question plus the first t generated tokens, t = 0 … T-1: the state in which the
student chose generated token t.
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # annotations only: importing this module must not import torch
    import torch


# ----------------------------------------------------------------------------
# The run, as plugins see it


@dataclass
class RunContext:
    """Run-level facts handed to every plugin factory: ``factory(options, run)``.

    seed:            the run seed (derive per-item seeds with gadiag_core.seeding)
    rollouts_total:  questions × rollouts per question (run budgets are shared evenly)
    max_new_tokens:  the student's generation limit
    temperature:     the student's sampling temperature τ
    dtype:           the student's dtype name (external teachers default to it)
    student:         the loaded Student (set before teachers are built; None before)
    registry:        the Registry (teachers build their contexts with `context(name)`)
    """

    seed: int = 0
    rollouts_total: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    dtype: str = "float32"
    student: Any = None
    registry: Any = None

    def context(self, name: str, **options) -> "ContextBuilder":
        """The named context builder (unknown names fail with a suggestion)."""
        if self.registry is None:
            raise RuntimeError("RunContext.context needs the registry")
        return self.registry.create("context", name, run=self, **options)


# ----------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Problem:
    """One question of a task.

    id:        stable identifier inside the task (used in records and for seeds)
    question:  the text shown to the student
    answer:    the gold final answer, as text
    solution:  a worked reference solution ending in the answer (privileged context)
    meta:      anything else the task wants to keep (level, subject, …)
    """

    id: str
    question: str
    answer: str
    solution: str
    meta: dict = field(default_factory=dict)


class Task(ABC):
    """A verifiable task: problems, the student prompt, and the verifier."""

    name: str = ""
    version: str = "0"
    description: str = ""

    @abstractmethod
    def problems(self, count: int, seed: int) -> list[Problem]:
        """The first `count` problems of this task for `seed` (deterministic)."""

    @abstractmethod
    def student_messages(self, problem: Problem) -> list[dict]:
        """Chat messages ending with the user's turn that asks `problem`."""

    @abstractmethod
    def verify(self, problem: Problem, completion: str) -> bool:
        """True when the student's completion text answers `problem` correctly.

        Must never raise on garbled text: garbage is simply wrong."""

    def wrong_answer(self, problem: Problem, rng: random.Random) -> str:
        """A plausible but wrong final answer (for the `wrong_answer` control).

        A numeric gold of any form ("43", "43.0", "-5", "3/4", "\\frac{3}{4}",
        "1,234") is shifted by a small nonzero integer, keeping its form; any
        other gold gets a small number. Every candidate is checked with this
        task's own verifier and the first it rejects is returned, so the control
        is never the gold answer in disguise ("43" for "43.0")."""
        gold = str(problem.answer).strip()
        for candidate in wrong_candidates(gold, rng):
            try:
                rejected = not self.verify(problem, self.answer_statement(candidate))
            except Exception:  # a verifier that raises on a plain number: take the candidate
                rejected = True
            if rejected:
                return candidate
        return "no answer"

    def answer_statement(self, answer: str) -> str:
        """How a final answer is stated in this task's solutions."""
        return f"The answer is {answer}."


_DECIMAL = re.compile(r"^([+\-\u2212]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?$")
_FRACTION = re.compile(r"^([+\-]?)\s*(\d+)\s*/\s*(\d+)$")
_LATEX_FRACTION = re.compile(r"^([+\-]?)\s*\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}$")


def wrong_candidates(gold: str, rng: random.Random) -> list[str]:
    """Wrong-answer candidates for a gold answer, most plausible first: the
    gold shifted by ±1…±3 (in a seeded order), then ±4…±9, in the gold's own
    form; for a non-numeric gold, small integers."""
    from decimal import Decimal, InvalidOperation
    from fractions import Fraction

    shifts = [-3, -2, -1, 1, 2, 3]
    rng.shuffle(shifts)
    shifts += [4, -4, 5, -5, 6, 7, 8, 9]
    text = gold.strip()

    def same_sign_first(values: list, gold_value) -> list:
        # A negative answer to a problem whose answer is positive is not plausible.
        return sorted(values, key=lambda v: (v < 0) != (gold_value < 0))

    match = _DECIMAL.match(text)
    if match:
        sign, digits, fraction = match.groups()
        try:
            value = Decimal(("-" if sign in ("-", "\u2212") else "") + digits.replace(",", "") + (fraction or ""))
        except InvalidOperation:
            value = None
        if value is not None:
            out = []
            for shifted in same_sign_first([value + shift for shift in shifts], value):
                body = f"{shifted:,}" if "," in digits else str(shifted)
                out.append(body)
            return out
    for pattern, latex in ((_LATEX_FRACTION, True), (_FRACTION, False)):
        match = pattern.match(text)
        if match and int(match.group(3)) != 0:
            value = Fraction(int(match.group(2)), int(match.group(3))) * (-1 if match.group(1) == "-" else 1)
            out = []
            for shifted in same_sign_first([value + shift for shift in shifts], value):
                num, den = shifted.numerator, shifted.denominator
                if den == 1:
                    out.append(str(num))
                elif latex:
                    out.append(f"{'-' if num < 0 else ''}\\frac{{{abs(num)}}}{{{den}}}")
                else:
                    out.append(f"{num}/{den}")
            return out
    return ["0", "1", "2", "-1", "10"]


# ----------------------------------------------------------------------------
# Causal language models (students and model teachers)


class CausalLM(ABC):
    """A causal LM with its tokenizer: what students and model teachers share."""

    name: str = ""
    model: torch.nn.Module
    tokenizer: Any

    @property
    @abstractmethod
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a completion."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Width V of the logits."""

    @abstractmethod
    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Chat-template ids of `messages` followed by the assistant turn's opening."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of generated ids (special tokens dropped)."""

    @abstractmethod
    def node_logits(self, prompt_ids: list[int], generated_ids: list[int]) -> torch.Tensor:
        """Logits at every node of a rollout in one forward pass.

        Returns [T, V] with T = len(generated_ids): row t is z(prompt + generated[:t]),
        the logits from which generated[t] was drawn (before temperature)."""

    def node_logits_many(self, prompts: list[list[int]], generated_ids: list[int]) -> list[torch.Tensor]:
        """node_logits(prompt, generated_ids) for each of `prompts` (one
        rollout read under several contexts). Called once per rollout with the
        student's prompt and every PromptedTeacher's on this model; a model
        may batch them (the values may then differ from single calls by float
        rounding, never by more). Default: one call each."""
        return [self.node_logits(prompt, generated_ids) for prompt in prompts]


class Student(CausalLM):
    """The model being diagnosed. Its policy is softmax(z / temperature)."""

    temperature: float = 1.0


# ----------------------------------------------------------------------------
# Teachers and their contexts


@dataclass
class RolloutView:
    """What a context builder may know about one student rollout."""

    index: int
    text: str
    correct: bool


@dataclass
class ContextInputs:
    """Everything a context builder may draw on for one rollout.

    task, problem:      the task and the question being answered
    student_messages:   the student's own prompt (Task.student_messages)
    other_problems:     other questions of the run (for control contexts)
    rollouts:           all student rollouts of this question (for self_success, feedback)
    rollout_index:      which of `rollouts` is being diagnosed
    rng:                seeded from (run seed, question, rollout): use it, not `random`
    """

    task: Task
    problem: Problem
    student_messages: list[dict]
    other_problems: list[Problem]
    rollouts: list[RolloutView]
    rollout_index: int
    rng: random.Random


class ContextBuilder(ABC):
    """Builds the teacher's prompt: the privileged context placed before the prefix."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def build(self, inputs: ContextInputs) -> Optional[list[dict]]:
        """Chat messages the teacher sees before the student's generated tokens.

        Return None when this context does not exist for the rollout (for example
        no other correct rollout for `self_success`); the teacher is then skipped
        for that rollout and the record says so."""


class Teacher(ABC):
    """Gives log p_T(.|u'_t) at every node of a student rollout.

    info: what reports show about the teacher, e.g. {"external": True, "model": …,
          "tokenizer": …, "via": "ids" | "bytes"}; empty for self-distillation teachers.
    """

    name: str = ""
    description: str = ""
    info: dict = {}

    @abstractmethod
    def node_logprobs(self, inputs: ContextInputs, generated_ids: list[int]) -> Optional[torch.Tensor]:
        """[T, V] log-probabilities of the teacher at each node, or None if the
        teacher has no context for this rollout. Row t conditions on the
        teacher's context followed by generated_ids[:t]."""


class PromptedTeacher(Teacher):
    """A teacher that is a causal LM `lm` shown a prompt of its own:
    log p_T = log_softmax(lm.node_logits(prompt_ids(inputs), generated)).

    Saying so lets the pipeline read a rollout once for the student and every
    such teacher on the same model (CausalLM.node_logits_many)."""

    lm: CausalLM

    @abstractmethod
    def prompt_ids(self, inputs: ContextInputs) -> Optional[list[int]]:
        """The teacher's prompt ids for this rollout (before the student's
        generated tokens), or None when it has no context here."""

    def node_logprobs(self, inputs: ContextInputs, generated_ids: list[int]) -> Optional[torch.Tensor]:
        import torch

        prompt = self.prompt_ids(inputs)
        if prompt is None:
            return None
        return torch.log_softmax(self.lm.node_logits(prompt, generated_ids).float(), dim=-1)


@dataclass
class CandidateLogprobs:
    """A CandidateTeacher's scores at the scored nodes (N of them).

    logprobs:          [N, V] log p over the student's vocabulary: the teacher's mass on
                       each candidate, the rest spread over the other tokens ∝ π
                       (what full-distribution objectives read)
    sampled_logprobs:  [N] log p of the sampled token's own event (for a byte teacher the
                       string probability of its bytes): sampled-token objectives
                       (Objective.reads == "sampled") read this instead of the row
    covered:           [N] teacher mass on the candidates (Σ_C p_k before the spread)
    left_out:          [N] mass the teacher's computation left out (caps), relative
    forwards:          extra teacher forwards spent
    """

    logprobs: torch.Tensor
    sampled_logprobs: torch.Tensor
    covered: torch.Tensor
    left_out: torch.Tensor
    forwards: int = 0


class CandidateTeacher(Teacher):
    """A teacher that cannot give log p over the student's whole vocabulary at
    every node (another tokenizer: DESIGN §5). It works in two steps around the
    estimator:

        prepare(inputs, generated_ids) -> handle or None (no context: skipped);
            handle.preferred [T]: the student token the teacher prefers at each
            node (the estimator adds it to the candidates)
        score(handle, nodes, candidates, sampled, student_logprobs) -> CandidateLogprobs
            on the nodes the estimator scored, given each node's candidate ids
            ([C] tensors), the sampled tokens [N] and log π [N, V]
    """

    @abstractmethod
    def prepare(self, inputs: ContextInputs, generated_ids: list[int]) -> Optional[Any]:
        """Per-rollout work before the estimator; None when there is no context."""

    @abstractmethod
    def score(self, prepared: Any, nodes: list[int], candidates: list, sampled: torch.Tensor, student_logprobs: torch.Tensor) -> CandidateLogprobs:
        """The teacher at the scored nodes, on their candidate sets."""

    def node_logprobs(self, inputs: ContextInputs, generated_ids: list[int]) -> Optional[torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} scores candidate sets: use prepare() and score()")


# ----------------------------------------------------------------------------
# Rollouts


@dataclass(frozen=True)
class ContinuationRequest:
    """Sample one continuation of `prefix_ids`.

    prefix_ids:      prompt plus the generated tokens so far
    max_new_tokens:  at most this many tokens after the prefix (forced one included)
    forced_first:    if set, the first new token is this id instead of a sample
    seed:            per-request seed (derived from run/question/rollout/node, never
                     from execution order) so results do not depend on batching
    """

    prefix_ids: tuple[int, ...]
    max_new_tokens: int
    forced_first: Optional[int] = None
    seed: int = 0


class RolloutSampler(ABC):
    """Samples continuations with plain temperature sampling (no top-k/top-p)."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def sample(self, lm: CausalLM, requests: list[ContinuationRequest], temperature: float) -> list[list[int]]:
        """One continuation per request: the new ids after the prefix, starting
        with the forced token when given, ending with an EOS id if one was drawn
        (then nothing follows it) or at max_new_tokens."""

    def open(self, lm: CausalLM, temperature: float) -> "SamplerSession":
        """A session that takes requests at any time and hands back each
        continuation as it finishes (the scheduler keeps rollouts flowing
        through it). This default gathers what was added and answers it with
        one `sample` call per `run`; a sampler that decodes continuously (the
        `prefix` sampler) lets requests join a running batch instead."""
        return CallSession(self, lm, temperature)


class SamplerSession:
    """Continuations as a stream: `add` requests, `run` until some finish.

    add(requests) -> tickets: one int per request, in order.
    run() -> [(ticket, continuation)]: decodes until at least one request
    added so far has finished and returns the finished ones (any order; []
    only when nothing is left). `pending` counts requests not yet returned.
    A continuation is what `RolloutSampler.sample` returns for its request."""

    def add(self, requests: list[ContinuationRequest]) -> list[int]:
        raise NotImplementedError

    def run(self) -> list[tuple[int, list[int]]]:
        raise NotImplementedError

    @property
    def pending(self) -> int:
        raise NotImplementedError


class CallSession(SamplerSession):
    """The default session: everything added since the last `run`, in one
    `sample` call."""

    def __init__(self, sampler: RolloutSampler, lm: CausalLM, temperature: float):
        self.sampler, self.lm, self.temperature = sampler, lm, temperature
        self.queue: list[tuple[int, ContinuationRequest]] = []
        self.tickets = 0

    def add(self, requests: list[ContinuationRequest]) -> list[int]:
        start = self.tickets
        self.tickets += len(requests)
        self.queue += list(zip(range(start, self.tickets), requests))
        return list(range(start, self.tickets))

    def run(self) -> list[tuple[int, list[int]]]:
        queue, self.queue = self.queue, []
        if not queue:
            return []
        outputs = self.sampler.sample(self.lm, [r for _, r in queue], self.temperature)
        return [(ticket, out) for (ticket, _), out in zip(queue, outputs)]

    @property
    def pending(self) -> int:
        return len(self.queue)


# ----------------------------------------------------------------------------
# Ideal-gradient estimation


@dataclass
class EstimationJob:
    """One student rollout handed to a gradient estimator.

    student_logits:     [T, V] z(u_t), before temperature
    teacher_preferred:  teacher name -> [T] argmax token of that teacher at each node
    verify:             completion text -> reward in {0, 1}
    max_new_tokens:     the student's generation limit: a continuation from node t
                        may add max_new_tokens − t tokens, as the rollout could
    seed:               derived from (run seed, question, rollout)
    """

    student: Student
    sampler: RolloutSampler
    prompt_ids: list[int]
    generated_ids: list[int]
    student_logits: torch.Tensor
    teacher_preferred: dict[str, torch.Tensor]
    verify: Any
    max_new_tokens: int
    seed: int


@dataclass
class NodeEstimate:
    """The ideal vector a*(u_t) at one targeted node, over its candidate tokens.

    Tokens outside `candidates` are value-neutral (Q = V), so a* is zero there.

    candidates:   [C] token ids
    probs:        [C] π_k of the candidates
    q_hat:        [C] Monte-Carlo Q(u_t, k)
    q_halves:     [2, C] Q̂ from two independent halves of the continuations
    counts:       [C] continuations behind each Q̂
    value:        V̂(u_t) = Σ_C π_k Q̂_k / covered_mass
    covered_mass: Σ_C π_k
    ideal:        [C] a*_k = π_k (Q̂_k − V̂) / τ
    ideal_halves: [2, C] the same from each half
    """

    node: int
    candidates: torch.Tensor
    probs: torch.Tensor
    q_hat: torch.Tensor
    q_halves: torch.Tensor
    counts: torch.Tensor
    value: float
    covered_mass: float
    ideal: torch.Tensor
    ideal_halves: torch.Tensor


@dataclass
class IdealEstimate:
    """What an estimator returns for one rollout.

    nodes:         the targeted nodes, in increasing t
    screen_bound:  [T] the bound 2(1 − π_max)/τ on ‖a*‖₁ at every node
    budget:        counts: continuations, sampled_tokens, nodes_screened, nodes_targeted
    """

    nodes: list[NodeEstimate]
    screen_bound: torch.Tensor
    budget: dict


class GradientEstimator(ABC):
    """Estimates the ideal vectors a*(u_t) along one rollout."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def estimate(self, job: EstimationJob) -> IdealEstimate:
        """The ideal vectors at the nodes this estimator targets."""


# ----------------------------------------------------------------------------
# Objectives


class Objective(ABC):
    """A distillation objective, as its logit-space descent vector b(u).

    reads: "distribution" (the teacher's whole row) or "sampled" (only
           log p at the sampled token: then a CandidateTeacher's
           sampled_logprobs, the exact string probability, is used there)
    """

    name: str = ""
    description: str = ""
    reads: str = "distribution"

    @abstractmethod
    def vector(
        self,
        student_logits: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        sampled: torch.Tensor,
        temperature: float,
    ) -> torch.Tensor:
        """b [N, V] from student logits [N, V], teacher log-probs [N, V] and the
        sampled tokens [N]; g_distill = Jᵀ b is minus the loss gradient."""
