"""Built-in rollout samplers: registration and options.

    prefix   shared-prefix KV caches, rows stop independently (prefix.py; the default)
    batched  plain batched KV-cache sampling, shared starts encoded once (batched.py)
    vllm     a vLLM engine (vllm.py; needs vllm installed, see README "Past one machine")

    draw.py           Gumbel-max token drawing with per-request noise streams (both)
    canonical.py      close draws redone batch-free: tokens independent of batching
    llama_decoder.py  the hand-written Llama/Qwen decoder the prefix sampler drives
    threads.py        whether extra torch threads run slower than one (a busy machine)

Loaded at the start of every command; the samplers (and torch, and vllm) are
imported only when one is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gadiag_core import hookimpl
from gadiag_core.options import as_dict, option


@dataclass(frozen=True)
class BatchedOptions:
    batch_size: int = option(32, "most rows sampled together", min=1, max=1_000_000)
    share_prefix: bool = option(True, "encode a start that several prefixes share once (off: every prefix whole)")
    redraw_margin: float = option(1e-3, "draws whose two best Gumbel scores are this close are redone batch-free, so tokens never depend on batching (0: never)", min=0)


@dataclass(frozen=True)
class PrefixOptions:
    batch_size: int = option(128, "most rows decoded together", min=1, max=1_000_000)
    threads: Optional[int] = option(None, "torch threads while sampling (none: decided by a quick check)", min=1, max=1024)
    stop_strings: list[str] = option([], "a row also stops once its text contains one of these")
    max_cache_mb: float = option(2048, "memory cap for one batch's KV caches (splits batches)", min=1)
    prefill_tokens: int = option(4096, "most padded prefix tokens encoded in one forward pass", min=1)
    pack_weights: Optional[bool] = option(None, "prepack weights for oneDNN (none: for models up to 600M parameters)")
    prefix_cache_mb: float = option(256, "memory for encoded prefixes kept for later requests (a rollout's next rounds; 0: none)", min=0)
    redraw_margin: float = option(1e-3, "draws whose two best Gumbel scores are this close are redone batch-free, so tokens never depend on batching (0: never)", min=0)


@dataclass(frozen=True)
class VllmOptions:
    model: Optional[str] = option(None, "weights vLLM loads (none: the student's own folder or hub id; must be the same weights)")
    batch_size: int = option(256, "most sequences vLLM decodes together (max_num_seqs)", min=1, max=1_000_000)
    kv_cache_gb: Optional[float] = option(None, "KV-cache memory in GiB (none: 2 on CPU, vLLM's gpu_memory_utilization on GPU)", min=0, min_exclusive=True)
    max_model_len: Optional[int] = option(None, "longest prefix + continuation (none: the model's limit)", min=1)
    enforce_eager: bool = option(True, "skip torch.compile and CUDA graphs: start-up in seconds rather than minutes")
    tensor_parallel_size: int = option(1, "GPUs one engine is split over", min=1, max=1024)
    block_size: Optional[int] = option(None, "KV-cache block in tokens: prefix caching shares whole blocks (none: 32 on CPU, vLLM's default on GPU)", min=1, max=4096)


def _batched(options: BatchedOptions, run):
    from gadiag_plugins.sampling.batched import BatchedSampler

    return BatchedSampler(**as_dict(options))


def _prefix(options: PrefixOptions, run):
    from gadiag_plugins.sampling.prefix import PrefixSampler

    return PrefixSampler(**as_dict(options))


def _vllm(options: VllmOptions, run):
    from gadiag_plugins.sampling.vllm import VllmSampler, import_vllm

    import_vllm()  # a missing or broken vllm fails here, before any sampling, as one line
    return VllmSampler(**as_dict(options))


@hookimpl
def register_samplers(register):
    register("batched", _batched, "batched KV-cache temperature sampling, per-request seeds", options=BatchedOptions)
    register("prefix", _prefix, "prefix-sharing batched sampler: each shared prefix encoded once, rows stop independently", options=PrefixOptions)
    register("vllm", _vllm, "vLLM engine: per-request seeds, plain temperature sampling, automatic prefix caching (needs vllm)", options=VllmOptions)
