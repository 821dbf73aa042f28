"""An embedded vector index on usearch (HNSW, cosine) with integer ids and optional labels.

Saved as a directory: `index.usearch` (usearch's own format) and `index.json` (dimension,
labels, the identity of the model that made the vectors, and the sha256 of the binary, checked
before usearch parses it). Vectors of another model are meaningless here, so the retrieval
pipeline refuses an index whose model is not its own.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmedge.errors import IntegrityError, InvalidInputError

_BIN, _META = "index.usearch", "index.json"
_FORMAT = "mmedge.index/1"


def check_k(k: object) -> int:
    """The number of hits asked for, checked: a positive int."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InvalidInputError(f"k must be a positive int, got {k!r}")
    return int(k)


@dataclass(frozen=True)
class Hit:
    id: int
    score: float  # cosine similarity
    label: str | None = None


class VectorIndex:
    """Cosine-similarity index; ids are non-negative integers chosen by the caller."""

    def __init__(self, dim: int, exact: bool = False, model: str | None = None):
        from usearch.index import Index

        if dim <= 0:
            raise InvalidInputError(f"index dimension must be positive, got {dim}")
        self.dim, self.exact = dim, exact
        self.model = model  # who embedded the vectors (RetrievalPipeline.model_id); None: not recorded
        self._index = Index(ndim=dim, metric="cos", dtype="f32")
        self._labels: dict[int, str] = {}
        self._lock = threading.RLock()  # usearch is safe for concurrent search, not for add/remove during it

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, id_: int) -> bool:
        return bool(self._index.contains(int(id_)))

    def _ids(self, ids: object, n: int) -> np.ndarray:
        try:
            arr = np.asarray(ids)
        except (ValueError, TypeError):  # ragged or otherwise not array-like
            raise InvalidInputError(
                f"ids must be {n} non-negative integers, got a ragged {type(ids).__name__}"
            ) from None
        if arr.ndim != 1 or arr.shape[0] != n or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
            raise InvalidInputError(
                f"ids must be {n} non-negative integers, got {arr.dtype} shape {arr.shape}"
            )
        if len(np.unique(arr)) != n:
            raise InvalidInputError("ids must be unique")
        return arr.astype(np.uint64)

    def _vectors(self, vectors: np.ndarray) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise InvalidInputError(f"vectors must have shape (N, {self.dim}), got {v.shape}")
        if not np.isfinite(v).all():
            raise InvalidInputError("vectors contain NaN or infinity")
        return np.ascontiguousarray(v)

    def label_ids(self) -> dict[str, int]:
        """label -> id of every labelled entry (e.g. an image path, to add a folder twice without duplicates)."""
        with self._lock:
            return {lab: i for i, lab in self._labels.items()}

    def add(self, ids: object, vectors: np.ndarray, labels: list[str] | None = None) -> None:
        """Add vectors under new ids (an id already present is an error, not an overwrite)."""
        v = self._vectors(vectors)
        keys = self._ids(ids, v.shape[0])
        if labels is not None and len(labels) != len(keys):
            raise InvalidInputError(f"got {len(labels)} labels for {len(keys)} vectors")
        with self._lock:
            present = [int(k) for k in keys if self._index.contains(int(k))]
            if present:
                raise InvalidInputError(f"ids already in the index: {present[:10]}; remove them first")
            self._index.add(keys, v)
            if labels is not None:
                self._labels.update({int(k): str(lab) for k, lab in zip(keys, labels)})

    def remove(self, ids: object) -> int:
        """Remove ids; returns how many were present."""
        keys = np.atleast_1d(np.asarray(ids))
        with self._lock:
            n = 0
            for k in keys.tolist():
                if self._index.contains(int(k)):
                    self._index.remove(int(k))
                    self._labels.pop(int(k), None)
                    n += 1
            return n

    def search(self, query: np.ndarray, k: int = 5) -> list[list[Hit]]:
        """Top-k hits per query row, best first."""
        check_k(k)
        q = self._vectors(query)
        with self._lock:
            if len(self._index) == 0:
                return [[] for _ in range(q.shape[0])]
            m = self._index.search(q, min(k, len(self._index)), exact=self.exact)
        keys = np.atleast_2d(m.keys)
        dist = np.atleast_2d(m.distances)
        counts = np.atleast_1d(m.counts) if hasattr(m, "counts") else [keys.shape[1]] * keys.shape[0]
        return [
            [
                Hit(int(i), float(1.0 - d), self._labels.get(int(i)))
                for i, d in zip(keys[r, : counts[r]], dist[r, : counts[r]])
            ]
            for r in range(keys.shape[0])
        ]

    def save(self, path: str | os.PathLike) -> None:
        """Write the index directory atomically."""
        from mmedge.runtime.package import sha256_file
        from mmedge.runtime.staging import staged_dir

        with self._lock, staged_dir(path) as tmp:
            self._index.save(str(tmp / _BIN))
            meta = {
                "format": _FORMAT,
                "dim": self.dim,
                "model": self.model,
                "sha256": sha256_file(tmp / _BIN),
                "labels": {str(k): v for k, v in self._labels.items()},
            }
            (tmp / _META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | os.PathLike, exact: bool = False) -> VectorIndex:
        """Load an index directory written by `save`, verifying the binary's hash first."""
        from mmedge.runtime.package import sha256_file

        root = Path(path)
        try:
            meta = json.loads((root / _META).read_text())
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{root}: cannot read {_META} ({exc})") from None
        if (
            not isinstance(meta, dict)
            or meta.get("format") != _FORMAT
            or not isinstance(meta.get("dim"), int)
        ):
            raise IntegrityError(f"{root}: {_META} is not an mmedge index description")
        if (
            (root / _BIN).is_symlink()
            or not (root / _BIN).is_file()
            or sha256_file(root / _BIN) != meta.get("sha256")
        ):
            raise IntegrityError(f"{root}: {_BIN} is missing or its sha256 differs from {_META}")
        model = meta.get("model")
        if model is not None and not isinstance(model, str):
            raise IntegrityError(f"{root}: {_META} names its model as {type(model).__name__}, not a string")
        idx = cls(meta["dim"], exact=exact, model=model)
        idx._index.load(str(root / _BIN))
        if idx._index.ndim != idx.dim:
            raise IntegrityError(
                f"{root}: index dimension {idx._index.ndim} differs from {_META}'s {idx.dim}"
            )
        idx._labels = {int(k): str(v) for k, v in meta.get("labels", {}).items()}
        return idx
