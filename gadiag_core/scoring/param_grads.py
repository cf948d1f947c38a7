"""Parameter-space gradients for the params* spaces (gadiag_core.scoring.spaces):
the selected parameters, one forward and batched backwards per rollout.

How params* is computed (one forward, batched backward; never a Python loop of
backward passes):

* One forward of prompt + generated, cut after the last node (nothing later
  changes the logits or gradients there), with only the selected parameters
  requiring grad (flags restored afterwards; .grad is never written).
* The output head in closed form: its weight gradient at node t is u_t h_tᵀ
  (u = ∂⟨z, v⟩/∂(head output), = v unless the model post-processes its
  logits, e.g. soft-capping), so the [V, H] gradient is never built. The
  gradient entering the network body is g = Wᵀu (float64) at the node's
  position.
* The input embedding's gradient on the rows of the tokens used (from the
  gradient at the embedding output; padding_idx and scale_grad_by_freq as
  nn.Embedding does); tied embeddings add the cross terms with the head's
  u hᵀ, so the shared weight's gradient is the sum of both uses.
* The body: one torch.autograd.grad(..., is_grads_batched=True) per chunk of
  rows, rows of several nodes batched together (node t's grad-output is
  nonzero only at its position; a node's gradient only involves positions
  ≤ t). An nn.Linear with the sequence no longer than its input width is
  "ghosted": the Gram of its weight gradients is ⟨Δ_i, X Xᵀ Δ_j⟩ from the
  gradient Δ at its output and its input X, cheaper than forming Δᵀ X; every
  other selected parameter's gradient is materialised. Only Gram entries
  inside a node (or inside the per-question group) are formed.
* Linearly dependent vectors (the ideal is the mean of its two halves; the
  sampled-token objectives and rl_outcome are all multiples of e_y − π at a
  node) are not back-propagated twice: a pivoted Cholesky of the unit
  vectors' Gram picks a basis (residual tolerance RANK_TOL) and the other
  vectors' parameter-space Gram entries follow by linearity.

Memory guard. Each back-propagated vector (row) holds its gradient values in
the model's dtype: the selected materialised parameters, L × out per ghosted
linear, L × H for the embedding rows (the head holds none). A batched backward
of B rows needs B × that; `memory_limit` (bytes), else the environment
variable GADIAG_GRAD_MEMORY ("2GiB", "512MiB", "3e9"), else 2 GiB, caps it.
Batches are chunked to stay under the cap (a node with more rows than fit is
done as pairs of half-size blocks); when two rows do not fit, a UsageError
says what to change. The cap covers those gradients, not the forward's
activations or the backward's transient buffers.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import time
from dataclasses import dataclass

import torch

from gadiag_core.errors import UsageError
from gadiag_core.scoring.param_select import select_parameters, unique_params

GRAD_MEMORY_ENV = "GADIAG_GRAD_MEMORY"
DEFAULT_GRAD_MEMORY = 2 * 1024**3
RANK_TOL = 1e-6  # residual norm of a unit vector below which it counts as dependent
GHOST_RATIO = 1.0  # ghost a linear layer when the sequence is at most this times its input width


# ----------------------------------------------------------------------------
# Memory limit


def parse_bytes(text) -> int:
    """'2GiB', '512MiB', '1.5GB', '3e9', 3000000000 -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", str(text))
    if not match:
        raise UsageError(f"{GRAD_MEMORY_ENV}={text!r}: give bytes, e.g. 2GiB, 512MiB or 3e9")
    try:
        value = float(match.group(1))
    except ValueError:
        raise UsageError(f"{GRAD_MEMORY_ENV}={text!r}: give bytes, e.g. 2GiB, 512MiB or 3e9") from None
    unit = (match.group(2) or "b").lower().rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(value * scale)


def grad_memory_limit(memory_limit=None) -> int:
    if memory_limit is not None:
        return parse_bytes(memory_limit)
    env = os.environ.get(GRAD_MEMORY_ENV)
    return parse_bytes(env) if env else DEFAULT_GRAD_MEMORY


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


# ----------------------------------------------------------------------------
# Linear algebra on unit vectors


def gram_cosine(gram: torch.Tensor, i: int, j: int) -> float:
    d = float(gram[i, i]) * float(gram[j, j])
    return float(gram[i, j]) / math.sqrt(d) if d > 0 else float("nan")


def _basis(rows: torch.Tensor, reduce_rank: bool) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A basis of the unit-normalised rows [K, D] and the coefficients X [K, r]
    with unit_k ≈ Σ_b X[k, b] unit_basis[b] (exact for basis rows; zero rows
    get zero coefficients). Returns (basis row indices, X, unit rows)."""
    rows = rows.double()
    norms = rows.norm(dim=1)
    unit = torch.where(norms[:, None] > 0, rows / norms.clamp_min(1e-300)[:, None], torch.zeros_like(rows))
    nonzero = [k for k in range(len(rows)) if norms[k] > 0]
    K = len(rows)
    if not reduce_rank:
        chosen = nonzero
    else:
        gram = unit @ unit.T
        chol = torch.zeros(K, K, dtype=torch.float64)
        chosen = []
        residual = gram.diagonal().clone()
        for step in range(K):
            masked = residual.clone()
            masked[chosen] = -1.0
            j = int(masked.argmax())
            if masked[j] <= RANK_TOL**2:
                break
            chol[:, step] = (gram[:, j] - chol[:, :step] @ chol[j, :step]) / masked[j].sqrt()
            residual = residual - chol[:, step] ** 2
            chosen.append(j)
        chosen.sort()
    X = torch.zeros(K, len(chosen), dtype=torch.float64)
    if chosen:
        if len(chosen) < len(nonzero):
            gram = unit @ unit[chosen].T  # [K, r]
            X = torch.linalg.solve(gram[chosen], gram.T).T
        for b, k in enumerate(chosen):
            X[k] = 0.0
            X[k, b] = 1.0
    return chosen, X, unit


# ----------------------------------------------------------------------------
# The model side: one forward with hooks


def model_of(student, space: str):
    model = getattr(student, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"gradient space {space!r} needs a student backed by a torch model (the 'hf' backend); "
            f"{type(student).__name__} has none: use space = \"logits\""
        )
    return model


def _head_of(model, space: str) -> torch.nn.Linear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise UsageError(
            f"gradient space {space!r} needs a model whose output head is a torch.nn.Linear "
            f"(found {type(head).__name__}): use space = \"logits\""
        )
    return head


def _sequence(prompt_ids, generated_ids, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids [L] and the position of each node [N]. Node t is read at
    position len(prompt) + t − 1 of prompt + generated[:-1] (as node_logits
    does); the sequence stops at the last node, since nothing later can change
    the logits or the gradients there (causal model)."""
    prompt_ids = [int(i) for i in prompt_ids]
    generated_ids = [int(i) for i in generated_ids]
    if not prompt_ids:
        raise ValueError("alignment_scores needs a non-empty prompt")
    positions = len(prompt_ids) + nodes.long() - 1
    if int(nodes.min()) < 0 or int(nodes.max()) >= len(generated_ids):
        raise ValueError(f"node indices must lie in 0 … {len(generated_ids) - 1}, got {nodes.tolist()}")
    ids = torch.tensor(prompt_ids + generated_ids[:-1], dtype=torch.long)[: int(positions.max()) + 1]
    return ids, positions


class _Forward:
    """One forward pass of prompt + generated[:-1] with hooks. Attributes:

    logits   [1, S, V] the model's logits (S = N with logits_to_keep, else L)
    head_out the output head's output, made a leaf (the head is not in the graph)
    head_in  [1, S, H] the head's input (in the graph when the body is)
    rows     [N] index of each node in dim 1 of logits/head_in
    embed    the input embedding's output made a leaf, or None
    calls    ghost module -> [(input X detached, output Y)] per call; the model
             goes on with a copy of Y, so Y is never changed in place
    """

    def __init__(self, model, head, ids: torch.Tensor, positions: torch.Tensor, embed_leaf: bool, ghost=()):
        self.head_in = self.head_out = self.embed = None
        self.calls = {module: [] for module in ghost}
        embedding = model.get_input_embeddings() if embed_leaf else None

        def head_hook(module, args, output):
            self.head_in = args[0]
            self.head_out = output.detach().requires_grad_(True)
            return self.head_out

        def embed_hook(module, args, output):
            self.embed = output.detach().requires_grad_(True)
            return self.embed

        def ghost_hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            self.calls[module].append((x.detach(), output))
            return output.clone()

        handles = [head.register_forward_hook(head_hook)]
        if embedding is not None:
            handles.append(embedding.register_forward_hook(embed_hook))
        handles += [module.register_forward_hook(ghost_hook, with_kwargs=True) for module in ghost]
        kwargs = {"use_cache": False}
        try:
            if "logits_to_keep" in inspect.signature(model.forward).parameters:
                kwargs["logits_to_keep"] = positions
        except (TypeError, ValueError):
            pass
        try:
            with torch.enable_grad():
                self.logits = model(input_ids=ids[None], **kwargs).logits
        finally:
            for handle in handles:
                handle.remove()
        if self.head_out is None:
            raise UsageError("the model's output head was not called in its forward pass: use space = \"logits\"")
        S = self.head_in.shape[1]
        self.rows = torch.arange(len(positions)) if S == len(positions) else positions.cpu()


def _head_grads(fwd: _Forward, vectors: torch.Tensor) -> torch.Tensor:
    """u [K, N, V] = ∂⟨z, v_k⟩/∂(head output) at the nodes, for v [K, N, V]."""
    if fwd.logits is fwd.head_out:
        return vectors
    K = vectors.shape[0]
    grad_out = torch.zeros((K,) + tuple(fwd.logits.shape), dtype=fwd.logits.dtype, device=fwd.logits.device)
    grad_out[:, 0, fwd.rows] = vectors.to(grad_out.dtype)
    (u,) = torch.autograd.grad(fwd.logits, fwd.head_out, grad_out, retain_graph=True, is_grads_batched=True)
    return u[:, 0, fwd.rows].float()


def _hidden_grads(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Wᵀu for u [..., V], W [V, H], in float64 (a float32 product of a few
    rows over a 50k vocabulary loses ~1e-5 of relative precision)."""
    return u.double().to(W.device) @ W.detach().double()


@dataclass
class _Group:
    """Rows whose Gram is wanted together: one node (node >= 0) or the whole
    rollout (node = -1). u: the basis rows' head-output gradients, [r, V] at
    the node for a node group, [r, N, V] for the rollout; g = Wᵀu likewise
    with H for V; gram [r, r]."""

    node: int
    u: torch.Tensor
    g: torch.Tensor = None
    gram: torch.Tensor = None


class _ParamsEngine:
    """Gram matrices of Jᵀu rows for the selected parameters of one rollout.

    Three kinds of selected parameter:
    * the output head (closed form, from u and the hidden states at the nodes);
    * the input embedding, when a plain nn.Embedding: its gradient on the used
      token rows, from the gradient at its output (plus the head's cross terms
      when tied); any other embedding module's weight is a body parameter
      (materialised, with the cross terms when tied);
    * the body: every nn.Linear whose weight only it uses is "ghosted" when the
      sequence is shorter than its input width: its weight-gradient Gram is
      ⟨Δ_i, X Xᵀ Δ_j⟩ from the gradient Δ at its output and its input X, so the
      [out, in] gradient is never formed (cost L²·out instead of L·in·out per
      row); every other parameter's gradient is materialised.
    """

    def __init__(self, model, space: str, prompt_ids, generated_ids, nodes: torch.Tensor, memory_limit):
        self.space = space
        self.head = _head_of(model, space)
        selected = select_parameters(model, space)
        sel_ids = {id(p) for _, p in selected}
        W, b = self.head.weight, self.head.bias
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        E = getattr(embedding, "weight", None)
        self.head_w = id(W) in sel_ids
        self.head_b = b is not None and id(b) in sel_ids
        self.tied = E is W
        self.embed_rows = type(embedding) is torch.nn.Embedding and E is not None and id(E) in sel_ids
        # A tied weight whose embedding use is not a plain nn.Embedding (e.g. a
        # scaled subclass): its embedding-use gradient is materialised like a
        # body parameter, and its cross terms with the head's u hᵀ added.
        self.tied_dense = self.tied and self.head_w and not self.embed_rows
        special = {id(W)} | ({id(b)} if b is not None else set()) | ({id(E)} if self.embed_rows else set())
        body = [(n, p) for n, p in selected if id(p) not in special or (self.tied_dense and p is W)]
        body_ids = {id(p) for _, p in body}
        self.itemsize = W.element_size()
        self.limit = grad_memory_limit(memory_limit)

        self.ids, positions = _sequence(prompt_ids, generated_ids, nodes)
        self.device = W.device

        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        self.ghost = [
            m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m is not self.head
            and id(m.weight) in body_ids and owners[id(m.weight)] == 1
            and (m.bias is None or owners[id(m.bias)] == 1)
            and len(self.ids) <= GHOST_RATIO * m.in_features
        ]
        self.ghost_bias = {m: m.bias is not None and id(m.bias) in body_ids for m in self.ghost}
        ghosted = {id(m.weight) for m in self.ghost} | {id(m.bias) for m in self.ghost if self.ghost_bias[m]}
        self.materialized = [p for _, p in body if id(p) not in ghosted]

        flags = {p: p.requires_grad for p in unique_params(model)}
        try:
            for p in flags:
                p.requires_grad_(id(p) in body_ids)
            self.fwd = _Forward(model, self.head, self.ids.to(self.device), positions.to(self.device), self.embed_rows, self.ghost)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        self.ghost = [m for m in self.ghost if self.fwd.calls[m]]
        self.kernels: dict = {}
        self.h = self.fwd.head_in[0, self.fwd.rows].detach().double().cpu()  # [N, H]
        self.has_backward = bool(self.ghost or self.materialized or self.embed_rows) and self.fwd.head_in.requires_grad
        if self.embed_rows:
            # Rows of the used tokens, as nn.Embedding's backward fills them:
            # none for padding_idx, 1/count per use with scale_grad_by_freq.
            self.unique_ids, self.inverse, counts = torch.unique(self.ids, return_inverse=True, return_counts=True)
            weight = torch.ones(len(self.ids), dtype=torch.float64)
            if embedding.padding_idx is not None:
                weight[self.ids == embedding.padding_idx] = 0.0
            if embedding.scale_grad_by_freq:
                weight = weight / counts[self.inverse].double()
            self.use_weight = weight
        self.row_elems = (
            sum(p.numel() for p in self.materialized)
            + sum(y.numel() for m in self.ghost for _, y in self.fwd.calls[m])
            + (len(self.ids) * W.shape[1] if self.embed_rows else 0)
        )

    def head_grads(self, vectors: torch.Tensor) -> torch.Tensor:
        return _head_grads(self.fwd, vectors)

    # -- Gram pieces --------------------------------------------------------

    def _head_gram(self, group: _Group) -> torch.Tensor:
        u = group.u.double()
        gram = torch.zeros(len(u), len(u), dtype=torch.float64)
        if group.node >= 0:
            dots = u @ u.T
            if self.head_w:
                gram += dots * float(self.h[group.node] @ self.h[group.node])
            if self.head_b:
                gram += dots
        else:
            if self.head_w:
                # ⟨Σ_n u_i[n] h_nᵀ, Σ_m u_j[m] h_mᵀ⟩ = Σ_nm (h_n·h_m)(u_i[n]·u_j[m])
                hh = self.h @ self.h.T  # [N, N]
                gram += u.reshape(len(u), -1) @ torch.einsum("nm,jmv->jnv", hh, u).reshape(len(u), -1).T
            if self.head_b:
                s = u.sum(1)
                gram += s @ s.T
        return gram

    def _embed_block(self, group: _Group, rows: list[int], delta: torch.Tensor) -> torch.Tensor:
        """Gram block of the embedding's gradient: S on the used token rows from
        the gradient at the embedding output delta [b, L, H], plus, when tied,
        the cross terms with the head's u hᵀ on those rows (its full square is
        in _head_gram)."""
        b = delta.shape[0]
        S = torch.zeros(b, len(self.unique_ids), delta.shape[-1], dtype=torch.float64)
        S.index_add_(1, self.inverse, delta.double() * self.use_weight[None, :, None])
        S = S.reshape(b, -1)
        block = S @ S.T
        if self.tied and self.head_w:
            u = group.u[rows][..., self.unique_ids].double()  # [b, U] or [b, N, U]
            if group.node >= 0:
                A = u[:, :, None] * self.h[group.node][None, None, :]
            else:
                A = torch.einsum("bnu,nh->buh", u, self.h)
            cross = S @ A.reshape(b, -1).T
            block += cross + cross.T
        return block

    def _tied_cross(self, group: _Group, rows: list[int], S: torch.Tensor) -> torch.Tensor:
        """⟨S_i, A_j⟩ for a materialised embedding-use gradient S [b, V, H] of
        the tied weight and the head's A_j = Σ_n u_j[n] h_nᵀ."""
        u = group.u[rows].double()
        if group.node >= 0:
            return torch.einsum("ivh,h,jv->ij", S, self.h[group.node], u)
        return torch.einsum("ivh,nh,jnv->ij", S, self.h, u)

    def _kernel(self, module) -> torch.Tensor:
        """X Xᵀ [L, L] of a ghost module's inputs (calls stacked along positions)."""
        if module not in self.kernels:
            X = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in self.fwd.calls[module]]).double()
            dtype = torch.promote_types(self.fwd.calls[module][0][1].dtype, torch.float32)
            self.kernels[module] = (X @ X.T).to(dtype)
        return self.kernels[module]

    def _backward(self, chunk: list[tuple[_Group, list[int]]]) -> None:
        """One batched backward for the rows of `chunk` (each item: a group and
        row indices in it); set each item's Gram block (body + embedding)."""
        head_in = self.fwd.head_in
        g_rows = []
        for group, rows in chunk:
            g = torch.zeros((len(rows),) + tuple(head_in.shape), dtype=head_in.dtype, device=head_in.device)
            if group.node >= 0:
                g[:, 0, self.fwd.rows[group.node]] = group.g[rows].to(g)
            else:
                g[:, 0, self.fwd.rows] = group.g[rows].to(g)
            g_rows.append(g)
        outputs = [y for m in self.ghost for _, y in self.fwd.calls[m]]
        inputs = outputs + self.materialized + ([self.fwd.embed] if self.embed_rows else [])
        grads = torch.autograd.grad(head_in, inputs, torch.cat(g_rows), retain_graph=True, is_grads_batched=True, allow_unused=True)
        ghost_grads, rest = grads[: len(outputs)], grads[len(outputs):]
        rows_total = sum(len(rows) for _, rows in chunk)
        start = 0
        for group, rows in chunk:
            b, stop = len(rows), start + len(rows)
            block = torch.zeros(b, b, dtype=torch.float64, device=head_in.device)
            k = 0
            for module in self.ghost:
                calls = self.fwd.calls[module]
                parts = [ghost_grads[k + c] for c in range(len(calls))]
                k += len(calls)
                if all(p is None for p in parts):
                    continue  # the module's output does not reach the nodes
                parts = [p if p is not None else torch.zeros((rows_total,) + tuple(y.shape), dtype=y.dtype, device=y.device) for p, (_, y) in zip(parts, calls)]
                # D [b, L, out]: the output gradients of the item's rows, calls stacked along positions.
                D = [p[start:stop].reshape(b, -1, p.shape[-1]) for p in parts]
                D = D[0] if len(D) == 1 else torch.cat(D, dim=1)  # [b, L, out]
                K = self._kernel(module)
                D = D.to(K.dtype)  # float32 at least (bf16 models)
                KD = torch.matmul(K, D)
                # Σ_s ⟨D_i[s], (K D_j)[s]⟩: short float32 sums per position, summed in float64.
                gram = torch.bmm(D.transpose(0, 1), KD.permute(1, 2, 0)).double().sum(0)
                block += (gram + gram.T) / 2
                if self.ghost_bias[module]:
                    s = D.double().sum(1)
                    block += s @ s.T
            for param, grad in zip(self.materialized, rest):
                if grad is not None:
                    flat = grad[start:stop].reshape(b, -1).double()
                    block += flat @ flat.T
                    if self.tied_dense and param is self.head.weight:
                        cross = self._tied_cross(group, rows, flat.view(b, *param.shape).cpu())
                        block += (cross + cross.T).to(block.device)
            block = block.cpu()
            if self.embed_rows and rest[-1] is not None:
                block += self._embed_block(group, rows, rest[-1][start:stop, 0].cpu())
            index = torch.tensor(rows)
            group.gram[index[:, None], index[None, :]] = block
            start = stop

    # -- Planning -----------------------------------------------------------

    def grams(self, groups: list[_Group], stats: dict) -> None:
        """Fill every group's Gram [r, r] (head + embedding + body); the node
        groups are batched together, the rollout group after them."""
        W64 = self.head.weight.detach().double()
        for group in groups:
            group.gram = torch.zeros(len(group.u), len(group.u), dtype=torch.float64)
            group.g = group.u.double().to(W64.device) @ W64
        del W64
        stats.setdefault("backward_calls", 0)
        stats.setdefault("backward_rows", 0)
        for key, part in (("node", [g for g in groups if g.node >= 0]), ("question", [g for g in groups if g.node < 0])):
            started, cpu = time.perf_counter(), time.process_time()
            if self.has_backward:
                self._plan_and_run(part, stats)
            for group in part:
                group.gram += self._head_gram(group)
            stats[f"{key}_s"] = time.perf_counter() - started
            stats[f"{key}_cpu_s"] = time.process_time() - cpu
            stats[f"{key}_rows"] = sum(len(g.u) for g in part)

    def capacity(self) -> int:
        """Rows of one batched backward under the memory limit."""
        return int(self.limit // (max(1, self.row_elems) * self.itemsize))

    def _plan_and_run(self, groups: list[_Group], stats: dict) -> None:
        per_row = max(1, self.row_elems) * self.itemsize
        capacity = self.capacity()
        largest = max((len(g.u) for g in groups), default=0)
        need = 1 if largest <= 1 else 2
        if capacity < need:
            raise UsageError(
                f"gradient space {self.space!r} needs {_mib(need * per_row)} for {need} gradient vector(s) "
                f"({self.row_elems:,} gradient values per vector × {self.itemsize} bytes) but the gradient memory "
                f"limit is {_mib(self.limit)}: raise it ({GRAD_MEMORY_ENV}=8GiB) or select fewer parameters "
                f"(e.g. params:last2 or params:re:<regex>)"
            )
        items: list[tuple[_Group, list[int]]] = []
        for group in groups:
            r = len(group.u)
            if r == 0:
                continue
            if r <= capacity:
                items.append((group, list(range(r))))
                continue
            # Too many rows for one backward: every pair of half-size blocks.
            size = capacity // 2
            blocks = [list(range(i, min(i + size, r))) for i in range(0, r, size)]
            for a in range(len(blocks)):
                for b in range(a + 1, len(blocks)):
                    items.append((group, blocks[a] + blocks[b]))
        chunks, used = [[]], 0
        for item in items:
            if chunks[-1] and used + len(item[1]) > capacity:
                chunks.append([])
                used = 0
            chunks[-1].append(item)
            used += len(item[1])
        for chunk in chunks:
            if chunk:
                self._backward(chunk)
                stats["backward_calls"] += 1
                stats["backward_rows"] += sum(len(rows) for _, rows in chunk)


# ----------------------------------------------------------------------------
# What alignment_scores calls


def hidden_gradients(model, space: str, prompt_ids, generated_ids, nodes: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """[K, N, H] the gradient Wᵀu arriving at the final hidden state at each node,
    for K logit-space vectors `stacked` [K, N, V] (one forward, no backward)."""
    head = _head_of(model, space)
    flags = {p: p.requires_grad for p in unique_params(model)}
    ids, positions = _sequence(prompt_ids, generated_ids, nodes)
    try:
        for p in flags:
            p.requires_grad_(False)
        fwd = _Forward(model, head, ids.to(head.weight.device), positions.to(head.weight.device), embed_leaf=False)
        u = _head_grads(fwd, stacked.to(head.weight.device))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return _hidden_grads(u, head.weight).cpu()


def parameter_grams(model, space: str, prompt_ids, generated_ids, nodes: torch.Tensor, stacked: torch.Tensor, memory_limit, reduce_rank: bool, stats) -> list[torch.Tensor]:
    """Parameter-space Gram matrices of K logit-space vectors `stacked` [K, N, V]:
    N + 1 matrices [K, K], one per node, then the per-question one (vectors
    summed over nodes). `stats`: filled as alignment_scores documents."""
    N = len(nodes)
    stats = {} if stats is None else stats
    started, cpu = time.perf_counter(), time.process_time()
    engine = _ParamsEngine(model, space, prompt_ids, generated_ids, nodes, memory_limit)
    u = engine.head_grads(stacked.to(engine.device)).float().cpu()  # [K, N, V]
    stats["forward_s"] = time.perf_counter() - started
    stats["forward_cpu_s"] = time.process_time() - cpu
    stats["vectors"] = len(stacked)
    stats["row_bytes"] = engine.row_elems * engine.itemsize
    stats["capacity"] = engine.capacity()
    groups, maps = [], []
    for n in range(N):
        basis, X, unit = _basis(u[:, n], reduce_rank)
        groups.append(_Group(n, unit[basis]))
        maps.append(X)
    basis, X, unit = _basis(u.reshape(len(stacked), -1), reduce_rank)
    question = _Group(-1, unit[basis].reshape(len(basis), N, -1))
    groups.append(question)
    maps.append(X)
    engine.grams(groups, stats)
    return [X @ group.gram @ X.T for X, group in zip(maps, groups)]  # [K, K] each
