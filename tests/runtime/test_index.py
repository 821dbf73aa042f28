"""The usearch-backed vector index: ids, labels, remove, save/load with hash check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmedge.errors import IntegrityError, InvalidInputError
from mmedge.runtime.index import VectorIndex


def _vecs(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_add_search_remove_and_labels() -> None:
    idx = VectorIndex(16, exact=True)
    v = _vecs(50)
    idx.add(np.arange(100, 150), v, labels=[f"item{i}" for i in range(50)])
    hits = idx.search(v[7], k=3)[0]
    assert hits[0].id == 107 and hits[0].label == "item7" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert idx.remove([107, 999]) == 1
    assert 107 not in idx and len(idx) == 49
    assert all(h.id != 107 for h in idx.search(v[7], k=5)[0])


def test_rejects_bad_input() -> None:
    idx = VectorIndex(4)
    with pytest.raises(InvalidInputError, match="shape"):
        idx.add([1], np.zeros((1, 5), np.float32))
    with pytest.raises(InvalidInputError, match="NaN"):
        idx.add([1], np.full((1, 4), np.nan, np.float32))
    with pytest.raises(InvalidInputError, match="unique"):
        idx.add([1, 1], np.ones((2, 4), np.float32))
    idx.add([1], np.ones((1, 4), np.float32))
    with pytest.raises(InvalidInputError, match="already"):
        idx.add([1], np.ones((1, 4), np.float32))
    with pytest.raises(InvalidInputError, match="k must"):
        idx.search(np.ones(4, np.float32), k=0)


def test_save_load_round_trip_and_tamper(tmp_path: Path) -> None:
    idx = VectorIndex(16, exact=True)
    v = _vecs(20)
    idx.add(np.arange(20), v, labels=[str(i) for i in range(20)])
    idx.save(tmp_path / "idx")
    back = VectorIndex.load(tmp_path / "idx", exact=True)
    assert len(back) == 20 and back.search(v[3], 1)[0][0].label == "3"
    blob = tmp_path / "idx" / "index.usearch"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        VectorIndex.load(tmp_path / "idx")


def test_empty_index_search() -> None:
    assert VectorIndex(8).search(np.ones(8, np.float32), 3) == [[]]
