"""The `exact` ideal-gradient estimator: Q(u, k) by enumerating every continuation.

For a student small enough to enumerate (a vocabulary of ~16 tokens and a
remaining horizon of ~6), the success probability after every token at every
node is a finite sum over continuations (DESIGN §2, "Ground truth"):

    Q(u, k) = R(u + k)                          if k is an EOS id or u + k uses up the horizon
            = V(u + k) = Σ_j π(j|u+k) Q(u+k, j)  otherwise

with exactly the sampler's rules (plugins/samplers.py): a continuation from
node t may add `max_new_tokens − t` tokens, the forced first one included; a
row ends with the EOS id it drew (kept in the ids, dropped from the decoded
text by `decode`) or at the horizon; the verifier reads
`decode(generated[:t] + continuation)`.

Algorithm (`enumerate_tree`). The prefix tree under the first scored node is
expanded breadth first. Level d holds every live prefix of d tokens (no EOS
yet); its next-token distributions come from ONE batched forward pass of the
model over the whole level (chunked into `batch_rows` rows only to bound
memory; all rows of a level have the same length, so no padding). The
children of row i through its non-EOS tokens are rows i·W + rank(k) of level
d + 1 (W = number of non-EOS ids), so nothing is searched. Then one sweep from
the deepest level up fills Q: terminal children by the verifier, the rest by
the child's V. Memoised: every later node of the rollout is a row of this one
tree (node t + 1 is the child of node t through y_t), so one expansion serves
every node, and the verifier is called once per distinct completion text.

What it returns (the same structure as `targeted`):
    candidates   = the whole vocabulary (all logits columns), so covered_mass = Σπ = 1
    q_hat        = the exact Q (float64)
    q_halves     = q_hat twice (there is no sampling noise: the two "halves" agree,
                   and the noise-ceiling row is exactly 1)
    counts       = 0 for every candidate: 0 means "exact, no continuations"
    ideal        = a*_k = π_k (Q_k − V) / τ over the full vocabulary, ideal_halves = it twice
    budget       = continuations 0, sampled_tokens 0, plus forward_rows (prefixes
                   scored), terminals (completions judged) and verifier_calls (distinct texts)

Limits: `max_vocab` (16), `max_horizon` (6) and `max_rows` (forward rows of
the tree, 3,000,000) give a clear UsageError beyond them instead of running
for hours; raise them at your own risk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gadiag_core.errors import UsageError
from gadiag_core.interfaces import (
    CausalLM,
    EstimationJob,
    GradientEstimator,
    IdealEstimate,
    NodeEstimate,
)
from gadiag_core.scoring.vectors import ideal_vector, policy, screen_bound


@dataclass
class ExactTree:
    """The enumerated prefix tree under one root node.

    root_prefix:  the generated ids before the root node (generated[:t0])
    horizon:      tokens a continuation from the root may add (max_new_tokens − t0)
    eos_ids:      the ids that end a completion
    levels:       per depth d = 0 … horizon−1: the live prefixes [N_d, d] (ids after the root)
    probs:        per depth: π(·|prefix) [N_d, V] (float64)
    q:            per depth: Q(prefix, k) [N_d, V] (float64)
    forward_rows: prefixes scored by the model (Σ N_d)
    terminals:    completions judged (children that end at EOS or at the horizon)
    verifier_calls: distinct completion texts given to the verifier
    """

    root_prefix: list[int]
    horizon: int
    eos_ids: list[int]
    levels: list[torch.Tensor]
    probs: list[torch.Tensor]
    q: list[torch.Tensor]
    forward_rows: int
    terminals: int
    verifier_calls: int

    @property
    def value(self) -> float:
        """V at the root."""
        return float((self.probs[0][0] * self.q[0][0]).sum())

    def row_of(self, path: list[int]) -> int:
        """Row index, at depth len(path), of the prefix `path` (ids after the root)."""
        width = self.probs[0].shape[-1]
        rank = _non_eos_rank(width, self.eos_ids)
        row = 0
        for token in path:
            r = rank[int(token)]
            if r < 0:
                raise ValueError(f"path {path} continues after an EOS id")
            row = row * (width - len(set(self.eos_ids))) + r
        return row

    def node(self, path: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(π [V], Q [V]) at the prefix `path` below the root."""
        d, row = len(path), self.row_of(path)
        return self.probs[d][row], self.q[d][row]


def _non_eos_rank(width: int, eos_ids) -> list[int]:
    """rank[k] = position of k among the non-EOS ids, −1 for EOS ids."""
    eos = set(int(e) for e in eos_ids)
    rank, r = [], 0
    for k in range(width):
        if k in eos:
            rank.append(-1)
        else:
            rank.append(r)
            r += 1
    return rank


def tree_rows(width: int, n_eos: int, horizon: int) -> int:
    """Forward rows of a full tree: Σ_{d<horizon} (width − n_eos)^d."""
    branch = width - n_eos
    return sum(branch**d for d in range(horizon))


def check_size(width: int, n_eos: int, horizon: int, max_vocab: int, max_horizon: int, max_rows: int) -> None:
    """UsageError when the tree is too big to enumerate."""
    advice = "the exact estimator is for tiny test models; use `targeted` (or raise the limit deliberately)"
    if width > max_vocab:
        raise UsageError(f"exact estimator: vocabulary of {width} tokens is over max_vocab={max_vocab}: {advice}")
    if horizon > max_horizon:
        raise UsageError(
            f"exact estimator: remaining horizon of {horizon} tokens is over max_horizon={max_horizon} "
            f"(lower max_new_tokens): {advice}"
        )
    rows = tree_rows(width, n_eos, horizon)
    if rows > max_rows:
        raise UsageError(f"exact estimator: the tree needs {rows:,} forward rows, over max_rows={max_rows:,}: {advice}")


def _level_logits(model, ids: torch.Tensor, batch_rows: int) -> torch.Tensor:
    """Last-position logits [N, V] of equal-length rows ids [N, L], in chunks."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for chunk in ids.split(batch_rows):
            logits = model(input_ids=chunk.to(device), use_cache=False).logits[:, -1, :]
            out.append(logits.float().cpu())
    return torch.cat(out)


class _Judge:
    """Rewards of completions (lists of ids), memoised by decoded text.

    Decoding is the hot spot (one call per terminal). For an HFCausalLM with a
    fast tokenizer the ids are decoded in one batched call of the tokenizer's
    backend; that path is checked against `lm.decode` on a sample of every
    batch and abandoned for good at the first difference, so the texts are
    always exactly what `lm.decode` gives."""

    def __init__(self, lm: CausalLM, verify):
        self.lm = lm
        self.verify = verify
        self.cache: dict[str, float] = {}
        self.batch_decode = _fast_batch_decoder(lm)

    def texts(self, seqs: list[list[int]]) -> list[str]:
        if self.batch_decode is not None:
            texts = self.batch_decode(seqs)
            step = max(1, len(seqs) // 32)
            if all(texts[i] == self.lm.decode(seqs[i]) for i in range(0, len(seqs), step)):
                return texts
            self.batch_decode = None
        return [self.lm.decode(s) for s in seqs]

    def __call__(self, seqs: list[list[int]]) -> torch.Tensor:
        out = []
        for text in self.texts(seqs):
            value = self.cache.get(text)
            if value is None:
                value = float(self.verify(text))
                self.cache[text] = value
            out.append(value)
        return torch.tensor(out, dtype=torch.float64)


def _fast_batch_decoder(lm: CausalLM):
    """A batched equivalent of HFCausalLM.decode, or None when unavailable."""
    from gadiag_plugins.students.hf import HFCausalLM

    if type(lm).decode is not HFCausalLM.decode:
        return None
    backend = getattr(getattr(lm, "tokenizer", None), "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode_batch"):
        return None
    return lambda seqs: backend.decode_batch(seqs, skip_special_tokens=True)


def enumerate_tree(
    lm: CausalLM,
    prompt_ids: list[int],
    root_prefix: list[int],
    horizon: int,
    verify,
    temperature: float = 1.0,
    batch_rows: int = 8192,
) -> ExactTree:
    """Every continuation of `prompt + root_prefix` of at most `horizon` tokens.

    verify: completion text -> reward in {0, 1}; it receives
            lm.decode(root_prefix + continuation), as the targeted estimator does.
    Returns the tree with exact π and Q at every live prefix (see ExactTree).
    The model is called as model(input_ids=[N, L]).logits (any Hugging Face causal LM).
    Long on purpose: one breadth-first enumeration whose levels share the batched forward state."""
    if horizon < 1:
        raise ValueError(f"horizon must be at least 1, got {horizon}")
    eos_ids = sorted(set(int(e) for e in lm.eos_token_ids))
    base = torch.tensor(list(prompt_ids) + list(root_prefix), dtype=torch.long)
    non_eos: torch.Tensor | None = None

    # Expansion, one batched forward per level.
    levels: list[torch.Tensor] = []
    probs: list[torch.Tensor] = []
    seqs = torch.zeros(1, 0, dtype=torch.long)
    for d in range(horizon):
        ids = torch.cat([base.expand(len(seqs), -1), seqs], dim=1)
        logits = _level_logits(lm.model, ids, batch_rows)
        if non_eos is None:
            width = logits.shape[-1]
            non_eos = torch.tensor([k for k in range(width) if k not in set(eos_ids)], dtype=torch.long)
        probs.append(policy(logits.double(), temperature))
        levels.append(seqs)
        if d + 1 < horizon:
            seqs = torch.cat(
                [seqs.repeat_interleave(len(non_eos), dim=0), non_eos.repeat(len(seqs)).unsqueeze(1)], dim=1
            )
    width = probs[0].shape[-1]

    # Rewards of terminal children: decoded in batches, judged once per distinct text.
    root = [int(i) for i in root_prefix]
    judge = _Judge(lm, verify)
    terminals = 0

    # Backward sweep: Q at the deepest level from the verifier, above from the child's V.
    q: list[torch.Tensor] = [None] * horizon  # type: ignore[list-item]
    child_value: torch.Tensor | None = None
    eos_t = torch.tensor(eos_ids, dtype=torch.long)
    root_t = torch.tensor(root, dtype=torch.long)

    def completions(prefixes: torch.Tensor, ends: torch.Tensor) -> list[list[int]]:
        """root + prefix + end for every prefix (rows) x end (columns), row-major."""
        n = len(prefixes)
        body = torch.cat([prefixes.repeat_interleave(len(ends), dim=0), ends.repeat(n).unsqueeze(1)], dim=1)
        return torch.cat([root_t.expand(len(body), -1), body], dim=1).tolist()

    for d in range(horizon - 1, -1, -1):
        n = len(levels[d])
        qd = torch.empty(n, width, dtype=torch.float64)
        if d == horizon - 1:  # every child is terminal: the horizon is used up
            qd.copy_(judge(completions(levels[d], torch.arange(width))).view(n, width))
            terminals += n * width
        else:
            if len(eos_ids):
                qd[:, eos_t] = judge(completions(levels[d], eos_t)).view(n, len(eos_ids))
                terminals += n * len(eos_ids)
            qd[:, non_eos] = child_value.view(n, len(non_eos))
        q[d] = qd
        child_value = (probs[d] * qd).sum(-1)

    return ExactTree(
        root_prefix=root,
        horizon=horizon,
        eos_ids=eos_ids,
        levels=levels,
        probs=probs,
        q=q,
        forward_rows=sum(len(s) for s in levels),
        terminals=terminals,
        verifier_calls=len(judge.cache),
    )


def exact_q_along(
    lm: CausalLM,
    prompt_ids: list[int],
    generated_ids: list[int],
    max_new_tokens: int,
    verify,
    temperature: float = 1.0,
    first_node: int = 0,
    batch_rows: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor, ExactTree]:
    """Exact π and Q at nodes first_node … T−1 of one rollout, from one tree.

    Returns (probs [T − first_node, V], q [T − first_node, V], tree), float64."""
    generated_ids = [int(i) for i in generated_ids]
    T = len(generated_ids)
    if T > max_new_tokens:
        raise ValueError(f"the rollout has {T} tokens, more than max_new_tokens={max_new_tokens}")
    tree = enumerate_tree(
        lm, prompt_ids, generated_ids[:first_node], max_new_tokens - first_node, verify, temperature, batch_rows
    )
    ps, qs = [], []
    for t in range(first_node, T):
        p, qv = tree.node(generated_ids[first_node:t])
        ps.append(p)
        qs.append(qv)
    width = tree.probs[0].shape[-1]
    if not ps:
        return torch.zeros(0, width, dtype=torch.float64), torch.zeros(0, width, dtype=torch.float64), tree
    return torch.stack(ps), torch.stack(qs), tree


class ExactEstimator(GradientEstimator):
    """Exact a*(u_t) on tiny models; see the module docstring.

    screen_epsilon: score only nodes with 1 − π_max ≥ this (default 0: every node)
    max_nodes:      at most this many nodes, the most uncertain (default: all)
    max_vocab, max_horizon, max_rows: size limits (UsageError beyond them)
    batch_rows:     rows per forward chunk (memory only; results do not depend on it)
    """

    name = "exact"
    description = "exact Q and a* by enumerating every continuation (tiny models only: ground truth)"

    def __init__(
        self,
        screen_epsilon: float = 0.0,
        max_nodes: int | None = None,
        max_vocab: int = 16,
        max_horizon: int = 6,
        max_rows: int = 3_000_000,
        batch_rows: int = 8192,
    ):
        if not 0 <= screen_epsilon < 1:
            raise UsageError("exact estimator: screen_epsilon must be in [0, 1)")
        if max_nodes is not None and max_nodes < 1:
            raise UsageError("exact estimator: max_nodes must be >= 1")
        if batch_rows < 1:
            raise UsageError("exact estimator: batch_rows must be >= 1")
        self.screen_epsilon = float(screen_epsilon)
        self.max_nodes = max_nodes
        self.max_vocab = int(max_vocab)
        self.max_horizon = int(max_horizon)
        self.max_rows = int(max_rows)
        self.batch_rows = int(batch_rows)

    def estimate(self, job: EstimationJob) -> IdealEstimate:
        tau = job.student.temperature
        probs_rollout = policy(job.student_logits.float(), tau)
        bound = screen_bound(probs_rollout, tau)
        spread = 1.0 - probs_rollout.max(-1).values
        nodes = (spread >= self.screen_epsilon).nonzero().flatten().tolist()
        if self.max_nodes is not None and len(nodes) > self.max_nodes:
            keep = spread[nodes].topk(self.max_nodes).indices.tolist()
            nodes = sorted(nodes[i] for i in keep)
        budget = {
            "continuations": 0,
            "sampled_tokens": 0,
            "nodes_screened": int(probs_rollout.shape[0]),
            "nodes_eligible": int((spread >= self.screen_epsilon).sum()),
            "nodes_targeted": len(nodes),
            "forward_rows": 0,
            "terminals": 0,
            "verifier_calls": 0,
        }
        if not nodes:
            return IdealEstimate(nodes=[], screen_bound=bound, budget=budget)

        first = nodes[0]
        width = max(int(job.student_logits.shape[-1]), int(job.student.vocab_size))
        n_eos = len(set(job.student.eos_token_ids))
        check_size(width, n_eos, job.max_new_tokens - first, self.max_vocab, self.max_horizon, self.max_rows)
        probs, q, tree = exact_q_along(
            job.student,
            job.prompt_ids,
            job.generated_ids,
            job.max_new_tokens,
            job.verify,
            tau,
            first_node=first,
            batch_rows=self.batch_rows,
        )
        budget.update(forward_rows=tree.forward_rows, terminals=tree.terminals, verifier_calls=tree.verifier_calls)
        estimates = []
        candidates = torch.arange(probs.shape[-1])
        for t in nodes:
            p, qt = probs[t - first], q[t - first]
            ideal = ideal_vector(p, qt, tau)
            estimates.append(
                NodeEstimate(
                    node=t,
                    candidates=candidates,
                    probs=p,
                    q_hat=qt,
                    q_halves=torch.stack([qt, qt]),
                    counts=torch.zeros(len(candidates), dtype=torch.long),
                    value=float((p * qt).sum()),
                    covered_mass=float(p.sum()),
                    ideal=ideal,
                    ideal_halves=torch.stack([ideal, ideal]),
                )
            )
        return IdealEstimate(nodes=estimates, screen_bound=bound, budget=budget)

