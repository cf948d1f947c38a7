"""A hand-written decoder for Llama/Qwen2/Qwen3-style models: the only file
of the samplers that knows model internals.

`_Arch.of(model)` reads the decoder's layers (fused q/k/v, rotary, RMS norms,
SwiGLU MLP) and `prepare` packs the weights for oneDNN on CPU in float32
(`_Linear`); `prefill` encodes prefixes and `head_logits` applies the output
head. The prefix sampler drives the decoding loop with these pieces. Models
of other architectures return None from `_Arch.of` and are sampled through
their own `forward`.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch


_RMS_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_HEAD_CHUNK = 1024  # output-head rows per plain matmul: ~15% faster than one big product on CPU
# Packing every Linear weight for oneDNN doubles the weights' memory; above
# this many parameters the sampler keeps plain matmuls unless told otherwise.
PACK_MAX_PARAMETERS = 600_000_000
# model -> (signature of its weights, packed?, per-layer linears, head)
_PREPARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prepared_pack(model) -> Optional[bool]:
    """Whether `model`'s prepared weights are packed (None: not prepared yet),
    so that another user of the decoder keeps the sampler's choice."""
    cached = _PREPARED.get(model)
    return None if cached is None else cached[1]


def _packing_available() -> bool:
    """Whether oneDNN's prepacked fp32 linear works here (x86 CPU builds)."""
    global _PACKING
    if _PACKING is None:
        try:
            weight, x = torch.randn(8, 16), torch.randn(3, 16)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            _PACKING = bool(torch.backends.mkldnn.is_available()) and torch.allclose(got, x @ weight.t(), atol=1e-4)
        except Exception:  # noqa: BLE001 - any failure means: not here
            _PACKING = False
    return _PACKING


_PACKING: Optional[bool] = None
_FUSING: Optional[bool] = None


def _fusing_available() -> bool:
    """Whether the packed linear also fuses swish, and a following mul/add."""
    global _FUSING
    if _FUSING is None:
        try:
            op = torch.ops.mkldnn._linear_pointwise
            weight, x, other = torch.randn(8, 16), torch.randn(3, 16), torch.randn(3, 8)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            plain = x @ weight.t()
            ok = torch.allclose(op(x, packed, None, "swish", [], ""), torch.nn.functional.silu(plain), atol=1e-4)
            ok = ok and torch.allclose(op.binary(x, other, packed, None, "mul"), plain * other, atol=1e-4)
            ok = ok and torch.allclose(op.binary(x, other, packed, None, "add"), plain + other, atol=1e-4)
            _FUSING = bool(ok) and _packing_available()
        except Exception:  # noqa: BLE001 - any failure means: not here
            _FUSING = False
    return _FUSING


class _Linear:
    """y = x Wᵀ + b, with W prepacked for oneDNN (15-50% faster than a plain
    fp32 matmul at decoding batch sizes on CPU) or as a plain matmul."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], pack: bool, chunk: int = 0):
        weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.out_features = weight.shape[0]
        self.packed = pack
        self.chunk = chunk
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if pack else weight

    def swish(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x Wᵀ + b), fused when packed."""
        if self.packed and _fusing_available():
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "swish", [], "")
        return torch.nn.functional.silu(self(x))

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x Wᵀ + b) * other, fused when packed."""
        if self.packed and _fusing_available():
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, "mul")
        return self(x) * other

    def plus(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x Wᵀ + b) + other, fused when packed (a residual connection)."""
        if self.packed and _fusing_available():
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, "add")
        return self(x) + other

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if not self.chunk or x.dim() != 2 or x.device.type != "cpu":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        out = torch.empty((x.shape[0], self.out_features), dtype=x.dtype, device=x.device)
        for start in range(0, self.out_features, self.chunk):
            stop = min(start + self.chunk, self.out_features)
            torch.mm(x, self.weight[start:stop].t(), out=out[:, start:stop])
        if self.bias is not None:
            out += self.bias
        return out


def _norm_fn(module):
    """A plain RMSNorm as one fused call (same arithmetic), else the module."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if type(module).__name__ in _RMS_NORMS and eps is not None and weight is not None and weight.dtype == torch.float32:
        shape = (weight.shape[-1],)
        return lambda x: torch.nn.functional.rms_norm(x, shape, weight, eps)
    return module


class _Arch:
    """A Llama-like decoder, driven by hand by the prefix sampler.

    Llama, Qwen2 and Qwen3 (q/k norms) share this layout: token embedding,
    rotary embedding, pre-norm blocks of grouped-query attention and a gated
    MLP, a final norm and an output head. The model's own weights and norms
    do the work; the q/k/v projections are fused into one matmul per layer,
    and on CPU in float32 every weight is prepacked for oneDNN (kept with the
    model between calls, rebuilt when a weight changes)."""

    SUPPORTED = {"llama", "qwen2", "qwen3"}

    def __init__(self, model):
        config = model.config
        base = self.base = model.model
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.layers = list(base.layers)
        self.norm = _norm_fn(base.norm)
        self.head = model.lm_head
        attn = self.layers[0].self_attn
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(attn, "head_dim", None) or config.hidden_size // self.heads)
        self.rep = self.heads // self.kv_heads
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.blocks = None
        self.head_linear = None

    @classmethod
    def of(cls, model) -> Optional["_Arch"]:
        """The architecture, or None when this model is not one the sampler
        knows how to drive (the caller then falls back to the batched path)."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in cls.SUPPORTED:
            return None
        if getattr(config, "model_type", None) != "llama" and getattr(config, "use_sliding_window", False):
            return None
        layer_types = getattr(config, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            return None
        try:
            arch = cls(model)
            for layer in arch.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                    if not isinstance(proj, torch.nn.Linear):
                        return None
                layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
            if not isinstance(arch.head, torch.nn.Linear):
                return None
        except (AttributeError, StopIteration, TypeError):
            return None
        if arch.heads % arch.kv_heads or arch.head_dim % 2:
            return None
        return arch

    def prepare(self, model, pack: Optional[bool] = None) -> None:
        """Build the per-layer blocks: (norm, qkv linear, attention module,
        o linear, h -> h + mlp(norm(h)))."""
        if pack is None:
            pack = sum(p.numel() for p in model.parameters()) <= PACK_MAX_PARAMETERS
        pack = bool(pack) and self.device.type == "cpu" and self.dtype == torch.float32 and _packing_available()
        linears = [self.head] + [
            module
            for layer in self.layers
            for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj)
            + tuple(getattr(layer.mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
            if module is not None
        ]
        signature = tuple((t.data_ptr(), t._version) for m in linears for t in (m.weight, m.bias) if t is not None)
        cached = _PREPARED.get(model)
        if cached is None or cached[0] != signature or cached[1] != pack:
            with torch.no_grad():
                per_layer = []
                for layer in self.layers:
                    attn, mlp = layer.self_attn, layer.mlp
                    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
                    weight = torch.cat([p.weight for p in projs])
                    bias = None
                    if any(p.bias is not None for p in projs):
                        bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs])
                    gated = all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
                    gated = gated and callable(getattr(mlp, "act_fn", None))
                    mlp_linears = (
                        tuple(_Linear(getattr(mlp, n).weight, getattr(mlp, n).bias, pack) for n in ("gate_proj", "up_proj", "down_proj"))
                        if gated
                        else None
                    )
                    per_layer.append((_Linear(weight, bias, pack), _Linear(attn.o_proj.weight, attn.o_proj.bias, pack), mlp_linears))
                head = _Linear(self.head.weight, self.head.bias, pack, chunk=_HEAD_CHUNK)
            cached = (signature, pack, per_layer, head)
            _PREPARED[model] = cached
        blocks = []
        for layer, (qkv, o, mlp_linears) in zip(self.layers, cached[2]):
            norm2 = _norm_fn(layer.post_attention_layernorm)
            if mlp_linears is None:
                mlp = (lambda module, norm: lambda h: h + module(norm(h)))(layer.mlp, norm2)
            elif type(layer.mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"):
                # h + down(silu(gate(x)) * up(x)), x = norm(h): three fused products.
                mlp = (lambda g, u, d, norm: lambda h: (lambda x: d.plus(u.times(x, g.swish(x)), h))(norm(h)))(*mlp_linears, norm2)
            else:
                mlp = (lambda g, u, d, act, norm: lambda h: (lambda x: h + d(act(g(x)) * u(x)))(norm(h)))(*mlp_linears, layer.mlp.act_fn, norm2)
            blocks.append((_norm_fn(layer.input_layernorm), qkv, layer.self_attn, o, mlp))
        self.blocks = blocks
        self.head_linear = cached[3]

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output head [N, D] -> [N, V] float32."""
        return self.head_linear(h).float()

    def rope_factors(self, h: torch.Tensor, positions: torch.Tensor):
        """cos and signed sin for positions [...] ([..., 1, d] each), so that
        rotary(x) = x * cos + roll(x, d/2) * sin for x [..., heads, d]."""
        half = self.head_dim // 2
        cos, sin = self.rotary(h, positions)
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)

    def qk_rotary(self, attn, qkv: torch.Tensor, cos, sin) -> torch.Tensor:
        """q and k of qkv [..., H + 2KV, d] with q/k norms (if any), rotary
        embedding and the softmax scaling (on q) applied: [..., H + KV, d]."""
        H, KV = self.heads, self.kv_heads
        if self.qk_norm:
            qk = torch.cat((attn.q_norm(qkv[..., :H, :]), attn.k_norm(qkv[..., H : H + KV, :])), dim=-2)
        else:
            qk = qkv[..., : H + KV, :]
        qk = torch.addcmul(qk * cos, torch.roll(qk, self.head_dim // 2, dims=-1), sin)
        qk[..., :H, :] *= self.scaling
        return qk

    def prefill(self, ids: torch.Tensor, keep_rows: torch.Tensor, keep_cols: torch.Tensor, past: Optional[list] = None, hidden: bool = False):
        """Encode right-padded prefixes ids [R, L] (causal attention keeps the
        padding out of every real position). Returns per-layer keys and values
        [R, KV, L, d] of these L positions and the logits [N, V] float32 at
        (keep_rows, keep_cols).

        past: per-layer (keys, values) [1, KV, C, d] of C tokens that come
        before every row (a common start, encoded once): the rows are then
        positions C … C + L − 1 and attend to those C keys as well.
        hidden: also return the final-norm hidden states of every position
        [R, L, D] (head_logits of a row of them is that position's logits)."""
        R, L = ids.shape
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        C = 0 if past is None else past[0][0].shape[-2]
        h = self.embed(ids)  # [R, L, D]
        positions = (torch.arange(L, device=ids.device) + C).unsqueeze(0).expand(R, L)
        cos, sin = self.rope_factors(h, positions)  # [R, L, 1, d]
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        # With a common start: query i sees the C shared keys and its own keys up to i.
        mask = None
        if C:
            mask = torch.arange(C + L, device=ids.device).unsqueeze(0) <= torch.arange(L, device=ids.device).unsqueeze(1) + C
        kv = []
        for l, (norm1, qkv_linear, attn, o_linear, residual_mlp) in enumerate(self.blocks):
            qkv = qkv_linear(norm1(h)).view(R, L, H + 2 * KV, d)
            qk = self.qk_rotary(attn, qkv, cos, sin)
            q = qk[:, :, :H].transpose(1, 2)  # [R, H, L, d]
            k = qk[:, :, H:].transpose(1, 2).contiguous()  # [R, KV, L, d]
            v = qkv[:, :, H + KV :].transpose(1, 2).contiguous()
            kv.append((k, v))
            if C:  # [R, KV, C + L, d]: the shared keys in front of each row's own
                k = torch.cat((past[l][0].expand(R, -1, -1, -1), k), dim=-2)
                v = torch.cat((past[l][1].expand(R, -1, -1, -1), v), dim=-2)
            if self.rep > 1:
                k, v = k.repeat_interleave(self.rep, dim=1), v.repeat_interleave(self.rep, dim=1)
            if C:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
            h = o_linear.plus(out.transpose(1, 2).reshape(R, L, H * d), h)
            h = residual_mlp(h)
        if hidden:
            normed = self.norm(h)
            logits = self.head_logits(normed[keep_rows, keep_cols]) if keep_rows.numel() else h.new_zeros((0, self.head.out_features), dtype=torch.float32)
            return kv, logits, normed
        if keep_rows.numel() == 0:
            return kv, h.new_zeros((0, self.head.out_features), dtype=torch.float32)
        return kv, self.head_logits(self.norm(h[keep_rows, keep_cols]))

    def prefill_rows(self, ids: torch.Tensor, lengths: list[int], pasts: list, keep_rows: torch.Tensor, keep_cols: torch.Tensor, hidden: bool = False):
        """Encode rows that each come after a start of their own.

        ids [R, L]: row i's lengths[i] tokens, right-padded to L. pasts[i]:
        per-layer (keys, values) [1, KV, C_i, d] of the C_i tokens before row
        i (None: C_i = 0), so row i's tokens are positions C_i … C_i + L_i − 1
        and attend to its own start and its own earlier tokens only (the rows
        of one batch never see each other). Returns the logits [N, V] float32
        at (keep_rows, keep_cols), columns counted from each row's first token.
        hidden: return (per-layer keys and values [R, KV, L, d] of the rows'
        own positions, those logits, final-norm hidden states [R, L, D])
        instead, as `prefill` does (the prefix sampler's joins: a root that
        extends a remembered prefix reads only its new tokens).

        Why: node_logits of one rollout under several prompts (the student's
        and its teachers' contexts) is one pass with R rows of ~T tokens
        instead of R passes of T (hf.py node_logits_many); with T ≈ 20 a pass
        is bound by reading the weights, so R of them cost nearly R times one."""
        R, L = ids.shape
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        device = ids.device
        starts = [0 if past is None else past[0][0].shape[-2] for past in pasts]
        C = max(starts)
        h = self.embed(ids)  # [R, L, D]
        positions = torch.arange(L, device=device).unsqueeze(0) + torch.tensor(starts, device=device).unsqueeze(1)  # [R, L]
        cos, sin = self.rope_factors(h, positions)  # [R, L, 1, d]
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        # [R, 1, L, C + L]: row i's query j sees its start's C_i keys and its own keys up to j.
        seen_start = torch.arange(C, device=device).unsqueeze(0) < torch.tensor(starts, device=device).unsqueeze(1)  # [R, C]
        causal = torch.arange(L, device=device).unsqueeze(0) <= torch.arange(L, device=device).unsqueeze(1)  # [L, L]
        mask = torch.cat((seen_start.unsqueeze(1).expand(R, L, C), causal.unsqueeze(0).expand(R, L, L)), dim=-1).unsqueeze(1)
        kv = []
        for l, (norm1, qkv_linear, attn, o_linear, residual_mlp) in enumerate(self.blocks):
            qkv = qkv_linear(norm1(h)).view(R, L, H + 2 * KV, d)
            qk = self.qk_rotary(attn, qkv, cos, sin)
            q = qk[:, :, :H].transpose(1, 2)  # [R, H, L, d]
            k = qk[:, :, H:].transpose(1, 2)  # [R, KV, L, d]
            v = qkv[:, :, H + KV :].transpose(1, 2)
            if hidden:
                kv.append((k.contiguous(), v.contiguous()))
            if C:  # each row's start in front of its own keys, zero-padded to C
                start_k = k.new_zeros((R, KV, C, d))
                start_v = v.new_zeros((R, KV, C, d))
                for i, past in enumerate(pasts):
                    if starts[i]:
                        start_k[i, :, : starts[i]] = past[l][0][0]
                        start_v[i, :, : starts[i]] = past[l][1][0]
                k, v = torch.cat((start_k, k), dim=-2), torch.cat((start_v, v), dim=-2)
            if self.rep > 1:
                k, v = k.repeat_interleave(self.rep, dim=1), v.repeat_interleave(self.rep, dim=1)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            h = o_linear.plus(out.transpose(1, 2).reshape(R, L, H * d), h)
            h = residual_mlp(h)
        if hidden:
            normed = self.norm(h)
            logits = self.head_logits(normed[keep_rows, keep_cols]) if keep_rows.numel() else h.new_zeros((0, self.head.out_features), dtype=torch.float32)
            return kv, logits, normed
        if keep_rows.numel() == 0:
            return h.new_zeros((0, self.head.out_features), dtype=torch.float32)
        return self.head_logits(self.norm(h[keep_rows, keep_cols]))

    def kv_bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return len(self.layers) * 2 * self.kv_heads * self.head_dim * element
