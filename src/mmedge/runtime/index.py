"""An embedded vector index on usearch (HNSW, cosine) with integer ids and optional labels: the
default implementation of `indexes.Index`.

Saved as a directory: `index.usearch` (usearch's own format) and `index.json` (dimension,
labels, the identity of the model that made the vectors, the sha256 of the binary, and a MAC under
this installation's key, `local_key.py`). usearch trusts its files, and a crafted graph crashes the
process on search, so only an index whose MAC checks is handed to usearch as it is; any other index
(written elsewhere, or edited) is rebuilt from its keys and vectors (`usearch_file.py`). Vectors of
another model are meaningless here, so the retrieval pipeline refuses an index whose model is not its
own.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

from mmedge.errors import IntegrityError, InvalidInputError
from mmedge.runtime.indexes import (
    Hit,
    check_ids,
    check_k,
    check_label,
    check_labels,
    check_vectors,
    removal_ids,
)
from mmedge.runtime.usearch_file import FREE_KEY

log = logging.getLogger(__name__)

_BIN, _META = "index.usearch", "index.json"
_FORMAT = "mmedge.index/1"
MAX_DIM = 1 << 16
_META_MAX_BYTES = 1 << 30
_META_KEYS = {"format", "dim", "model", "sha256", "labels", "mac"}


class VectorIndex:
    """Cosine-similarity index; ids are non-negative integers chosen by the caller.

    It lives in memory; `save()` writes it to `location` (the directory it was loaded from or
    opened at), `save(path)` anywhere."""

    def __init__(
        self,
        dim: int,
        exact: bool = False,
        model: str | None = None,
        location: str | os.PathLike | None = None,
    ):
        from usearch.index import Index

        if dim <= 0:
            raise InvalidInputError(f"index dimension must be positive, got {dim}")
        self.dim, self.exact = dim, exact
        self.model = model  # who embedded the vectors (RetrievalPipeline.model_id); None: not recorded
        self.location = None if location is None else Path(location)
        self._index = Index(ndim=dim, metric="cos", dtype="f32")
        self._labels: dict[int, str] = {}
        self._lock = threading.RLock()  # usearch is safe for concurrent search, not for add/remove during it

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, id_: int) -> bool:
        if isinstance(id_, bool) or not isinstance(id_, (int, np.integer)) or not 0 <= id_ < FREE_KEY:
            return False  # not an id, so never in the index
        return bool(self._index.contains(int(id_)))

    def find_labels(self, labels: list[str]) -> dict[str, int]:
        """label -> id of those given labels that the index holds (e.g. image paths already added)."""
        wanted = set(labels)
        with self._lock:
            return {lab: i for i, lab in self._labels.items() if lab in wanted}

    def add(self, ids: object, vectors: np.ndarray, labels: list[str] | None = None) -> None:
        """Add vectors under new ids (an id already present is an error, not an overwrite)."""
        v = check_vectors(vectors, self.dim)
        keys = check_ids(ids, v.shape[0])
        labels = check_labels(labels, len(keys))
        with self._lock:
            present = [int(k) for k in keys if self._index.contains(int(k))]
            if present:
                raise InvalidInputError(f"ids already in the index: {present[:10]}; remove them first")
            self._index.add(keys, v)
            if labels is not None:
                self._labels.update({int(k): lab for k, lab in zip(keys, labels)})

    def remove(self, ids: object) -> int:
        """Remove ids; returns how many were present."""
        keys = removal_ids(ids)
        with self._lock:
            n = 0
            for k in keys:
                if self._index.contains(int(k)):
                    self._index.remove(int(k))
                    self._labels.pop(int(k), None)
                    n += 1
            return n

    def search(self, query: np.ndarray, k: int = 5) -> list[list[Hit]]:
        """Top-k hits per query row, best first."""
        check_k(k)
        q = check_vectors(query, self.dim)
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

    def save(self, path: str | os.PathLike | None = None) -> None:
        """Write the index directory (`path`, else `location`) atomically, with a MAC under this
        installation's key."""
        from mmedge.runtime.local_key import local_key, mac
        from mmedge.runtime.package import sha256_file
        from mmedge.runtime.staging import staged_dir

        if path is None:
            if self.location is None:
                raise InvalidInputError("this index was not opened at a location: save(path) names one")
            path = self.location
        key = local_key(create=True)
        with self._lock, staged_dir(path) as tmp:
            self._index.save(str(tmp / _BIN))
            meta: dict[str, object] = {
                "format": _FORMAT,
                "dim": self.dim,
                "model": self.model,
                "sha256": sha256_file(tmp / _BIN),
                "labels": {str(k): v for k, v in self._labels.items()},
            }
            if key is not None:
                meta["mac"] = mac(key, _signed(meta))
            (tmp / _META).write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | os.PathLike, exact: bool = False) -> VectorIndex:
        """Load an index directory written by `save`, verifying the binary's hash first.

        An index this installation wrote (its MAC checks) is loaded as it is; any other is rebuilt
        from its keys and vectors, so that no crafted graph reaches usearch. Save it again to make
        the next load fast.
        """
        from mmedge.runtime.local_key import local_key, mac_ok
        from mmedge.runtime.package import sha256_file
        from mmedge.runtime.usearch_file import read_usearch

        root = Path(path)
        meta = _read_meta(root)
        if (
            (root / _BIN).is_symlink()
            or not (root / _BIN).is_file()
            or sha256_file(root / _BIN) != meta.get("sha256")
        ):
            raise IntegrityError(f"{root}: {_BIN} is missing or its sha256 differs from {_META}")
        idx = cls(meta["dim"], exact=exact, model=meta.get("model"), location=root)
        if "mac" in meta and mac_ok(local_key(), _signed(meta), meta["mac"]):
            try:
                idx._index.load(str(root / _BIN))
            except RuntimeError as exc:  # a file of ours that cannot be read back (another usearch?)
                raise IntegrityError(f"{root}: usearch cannot load {_BIN} ({exc})") from None
            if idx._index.ndim != idx.dim:
                raise IntegrityError(
                    f"{root}: index dimension {idx._index.ndim} differs from {_META}'s {idx.dim}"
                )
        else:
            try:
                keys, vectors = read_usearch((root / _BIN).read_bytes(), idx.dim)
            except IntegrityError as exc:
                raise IntegrityError(f"{root}: {exc}") from None
            if len(keys):
                idx._index.add(keys, vectors)
            log.info("%s was not written by this installation: rebuilt from its %d vectors", root, len(keys))
        idx._labels = _labels(root, meta.get("labels", {}), idx)
        return idx


def _signed(meta: dict) -> bytes:
    """The bytes the MAC covers: every field but the MAC, canonically (the binary by its sha256)."""
    return json.dumps(
        {k: v for k, v in meta.items() if k != "mac"}, sort_keys=True, separators=(",", ":")
    ).encode()


def _read_meta(root: Path) -> dict:
    """index.json, parsed and checked field by field."""
    try:
        if (root / _META).stat().st_size > _META_MAX_BYTES:
            raise IntegrityError(f"{root}: {_META} is larger than {_META_MAX_BYTES} bytes")
        meta = json.loads((root / _META).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{root}: cannot read {_META} ({type(exc).__name__}: {exc})"[:400]) from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != _FORMAT
        or type(meta.get("dim")) is not int
        or not meta.keys() <= _META_KEYS
    ):
        raise IntegrityError(f"{root}: {_META} is not an mmedge index description")
    if not 0 < meta["dim"] <= MAX_DIM:
        raise IntegrityError(f"{root}: {_META} gives dimension {meta['dim']}, not 1..{MAX_DIM}")
    model = meta.get("model")
    if model is not None and not isinstance(model, str):
        raise IntegrityError(f"{root}: {_META} names its model as {type(model).__name__}, not a string")
    if not isinstance(meta.get("labels", {}), dict):
        raise IntegrityError(f"{root}: {_META}'s labels are not an object of id -> label")
    return meta


def _labels(root: Path, raw: dict, idx: VectorIndex) -> dict[int, str]:
    """Labels of index.json, checked: decimal ids that are in the index, valid label strings."""
    out: dict[int, str] = {}
    for k, v in raw.items():
        if not (k.isascii() and k.isdigit() and len(k) <= 20 and int(k) < FREE_KEY):
            raise IntegrityError(f"{root}: {_META} labels an id {k[:40]!r} that is not a valid id")
        try:
            out[int(k)] = check_label(v)
        except InvalidInputError as exc:
            raise IntegrityError(f"{root}: {_META} has a bad label for id {k}: {exc}") from None
    if out:
        ids = np.fromiter(out, np.uint64, len(out))
        present = np.atleast_1d(np.asarray(idx._index.contains(ids), dtype=bool))
        if not present.all():
            raise IntegrityError(
                f"{root}: {_META} labels id {int(ids[~present][0])}, which is not in the index"
            )
    return out
