"""The exact environment: a tiny seeded student, the `toy` task, fixed rollouts
and the exact ideal vectors at every node (ground truth for DESIGN §1–2).

    env = build_environment()                 # ~2–3 s on one thread
    for r in env.rollouts:
        r.exact_q            # [T, V] exact Q(u_t, k) (gadiag_plugins.estimation.exact.enumerate_tree)
        r.exact_ideal        # [T, V] exact a*(u_t)
        r.teacher_logprobs   # name -> [T, V]
        env.job(r, seed)     # an EstimationJob for any estimator

The student is a 2-layer Llama with a 12-token vocabulary (the digits 0–7, an
EOS, two role markers and <unk>), randomly initialised from a seed (std 0.3,
so its next-token distributions are peaked but not certain). On the `toy`
task (digit sum in a window) with 4 new tokens its success probabilities at
the root are about 0.3–0.55, and every tree has 1 + 11 + 121 + 1331 prefixes,
enumerated in ~0.1 s.

Teachers (each gives log p at every node of a rollout; all share the tokenizer):
    other_model    a second random toy model (another seed), same prompt
    self_solution  the student itself, with a reference answer after the question
    informed       synthetic: log p ∝ log π + β (Q − V) + σ ε with the exact Q and
                   Gaussian ε (β = 4, σ = 1, seeded): a teacher that partly knows
                   which tokens help, so that true cosines span a wide range
                   (needed to see the noise shrinkage, which is proportional to cos)

Nothing here imports tests/; the package can build it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from gadiag_core.interfaces import (
    ContinuationRequest,
    EstimationJob,
    Problem,
    RolloutSampler,
    Task,
)
from gadiag_core.seeding import derive_seed
from gadiag_core.scoring.vectors import ideal_vector

SPECIAL_TOKENS = ["<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
DIGITS = "01234567"
TOY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|assistant|>' if message['role'] == 'assistant' else '<|user|>' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
TEACHERS = ("other_model", "self_solution", "informed")
DEFAULT_MAX_NEW_TOKENS = 4


def make_toy_tokenizer():
    """A 12-token character-level tokenizer: <unk>, <|user|>, <|assistant|>,
    <|end|> (EOS and pad), then the digits 0–7. Any other character is <unk>;
    decoding drops the four special tokens. The chat template is
    ``<|user|>CONTENT<|assistant|>`` (assistant turns end with <|end|>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(DIGITS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|end|>",
        pad_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        chat_template=TOY_CHAT_TEMPLATE,
    )


def make_toy_model(seed: int = 0, hidden: int = 32, layers: int = 2, init_std: float = 0.3, tokenizer=None):
    """A randomly initialised LlamaForCausalLM for the toy tokenizer (eval mode,
    float32, untied head). Same arguments -> same weights (for one torch version)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or make_toy_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=init_std,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def make_toy_lm(seed: int = 0, temperature: float = 1.0, name: Optional[str] = None, **model_kwargs):
    """The toy model as a gadiag Student (HFCausalLM)."""
    from gadiag_plugins.students.hf import HFCausalLM

    tokenizer = make_toy_tokenizer()
    model = make_toy_model(seed, tokenizer=tokenizer, **model_kwargs)
    return HFCausalLM(model, tokenizer, name=name or f"toy-seed{seed}", temperature=temperature)


def save_toy_model(path, seed: int = 0, **model_kwargs) -> Path:
    """Save the toy model and tokenizer to `path` (usable as `--model PATH` with
    `--task toy --max-new-tokens 4 --estimator exact`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_toy_tokenizer()
    make_toy_model(seed, tokenizer=tokenizer, **model_kwargs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------
# The environment


@dataclass
class ToyRollout:
    """One fixed student rollout with its exact quantities at every node t < T.

    student_logits:  [T, V] z(u_t)
    exact_probs:     [T, V] π(·|u_t) (float64, from the enumeration)
    exact_q:         [T, V] Q(u_t, k) (float64)
    exact_ideal:     [T, V] a*(u_t) (float64)
    teacher_logprobs: teacher name -> [T, V] log p
    """

    problem: Problem
    index: int
    prompt_ids: list[int]
    generated_ids: list[int]
    correct: bool
    student_logits: torch.Tensor
    exact_probs: torch.Tensor
    exact_q: torch.Tensor
    exact_ideal: torch.Tensor
    teacher_logprobs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def value(self) -> float:
        """V at node 0."""
        return float((self.exact_probs[0] * self.exact_q[0]).sum()) if len(self.generated_ids) else float("nan")


@dataclass
class ToyEnvironment:
    student: object
    task: Task
    sampler: RolloutSampler
    max_new_tokens: int
    rollouts: list[ToyRollout]
    teachers: tuple[str, ...]
    seed: int

    def verifier(self, rollout: ToyRollout):
        return lambda text: self.task.verify(rollout.problem, text)

    def job(self, rollout: ToyRollout, seed: int) -> EstimationJob:
        """The EstimationJob a pipeline would build for this rollout, with the
        estimator seed `seed` (vary it for independent replicates)."""
        return EstimationJob(
            student=self.student,
            sampler=self.sampler,
            prompt_ids=list(rollout.prompt_ids),
            generated_ids=list(rollout.generated_ids),
            student_logits=rollout.student_logits,
            teacher_preferred={name: lp.argmax(-1) for name, lp in rollout.teacher_logprobs.items()},
            verify=self.verifier(rollout),
            max_new_tokens=self.max_new_tokens,
            seed=derive_seed(self.seed, "estimator-replicate", rollout.problem.id, rollout.index, seed),
        )

    @property
    def nodes(self) -> int:
        return sum(len(r.generated_ids) for r in self.rollouts)


def informed_logprobs(probs: torch.Tensor, q: torch.Tensor, generator: torch.Generator, beta: float = 4.0, sigma: float = 1.0) -> torch.Tensor:
    """The synthetic `informed` teacher: log_softmax(log π + β (Q − V) + σ ε)."""
    value = (probs * q).sum(-1, keepdim=True)
    noise = torch.randn(probs.shape, generator=generator, dtype=torch.float64)
    logits = probs.clamp_min(1e-30).log() + beta * (q - value) + sigma * noise
    return torch.log_softmax(logits, dim=-1).float()


def build_environment(
    problems: int = 10,
    rollouts_per_problem: int = 2,
    seed: int = 0,
    model_seed: int = 0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 1.0,
    task: Optional[Task] = None,
    sampler: Optional[RolloutSampler] = None,
    student=None,
) -> ToyEnvironment:
    """Sample fixed rollouts of the toy student and compute the exact quantities.

    task defaults to the `toy` task and sampler to `batched` (batch 512); pass
    registry-built ones to use plugins instead. Exact Q comes from
    `gadiag_plugins.estimation.exact.enumerate_tree`, one tree per problem."""
    if task is None:
        from gadiag_tasks.toy import ToyTask

        task = ToyTask()
    if sampler is None:
        from gadiag_plugins.sampling.batched import BatchedSampler

        sampler = BatchedSampler(batch_size=512)
    from gadiag_plugins.estimation.exact import enumerate_tree

    student = student or make_toy_lm(model_seed, temperature=temperature)
    other = make_toy_lm(model_seed + 1000, name="toy-other")

    problem_list = task.problems(problems, seed)
    requests, meta = [], []
    for problem in problem_list:
        prompt_ids = student.encode_messages(task.student_messages(problem))
        for index in range(rollouts_per_problem):
            requests.append(
                ContinuationRequest(
                    prefix_ids=tuple(prompt_ids),
                    max_new_tokens=max_new_tokens,
                    seed=derive_seed(seed, "toy-rollout", problem.id, index),
                )
            )
            meta.append((problem, index, prompt_ids))
    outputs = sampler.sample(student, requests, student.temperature)

    generator = torch.Generator().manual_seed(derive_seed(seed, "informed-teacher") % (2**62))
    env = ToyEnvironment(student, task, sampler, max_new_tokens, [], TEACHERS, seed)
    trees = {}
    for (problem, index, prompt_ids), generated in zip(meta, outputs):
        if not generated:
            continue
        text = student.decode(generated)
        z = student.node_logits(prompt_ids, generated).float()
        rollout = ToyRollout(
            problem=problem,
            index=index,
            prompt_ids=list(prompt_ids),
            generated_ids=list(generated),
            correct=bool(task.verify(problem, text)),
            student_logits=z,
            exact_probs=torch.empty(0),
            exact_q=torch.empty(0),
            exact_ideal=torch.empty(0),
        )
        # Exact Q at every node: one tree per problem serves all its rollouts.
        if problem.id not in trees:
            trees[problem.id] = enumerate_tree(
                student, prompt_ids, [], max_new_tokens, env.verifier(rollout), student.temperature
            )
        tree = trees[problem.id]
        nodes = [tree.node(generated[:t]) for t in range(len(generated))]
        rollout.exact_probs = torch.stack([p for p, _ in nodes])
        rollout.exact_q = torch.stack([q for _, q in nodes])
        rollout.exact_ideal = ideal_vector(rollout.exact_probs, rollout.exact_q, student.temperature)

        teacher_prompt = student.encode_messages([{"role": "user", "content": f"{problem.question} {problem.solution}"}])
        rollout.teacher_logprobs = {
            "other_model": torch.log_softmax(other.node_logits(prompt_ids, generated).float(), -1),
            "self_solution": torch.log_softmax(student.node_logits(teacher_prompt, generated).float(), -1),
            "informed": informed_logprobs(rollout.exact_probs, rollout.exact_q, generator),
        }
        env.rollouts.append(rollout)
    return env


__all__ = [
    "make_toy_tokenizer",
    "make_toy_model",
    "make_toy_lm",
    "save_toy_model",
    "ToyRollout",
    "ToyEnvironment",
    "build_environment",
    "informed_logprobs",
    "TEACHERS",
]
