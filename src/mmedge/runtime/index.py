"""An embedded vector index on usearch (HNSW, cosine) with integer ids and optional labels.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmedge.errors import IntegrityError, InvalidInputError
from mmedge.runtime.usearch_file import FREE_KEY

log = logging.getLogger(__name__)

_BIN, _META = "index.usearch", "index.json"
_FORMAT = "mmedge.index/1"
MAX_LABEL_CHARS = 4096  # a label is a name or a path; PATH_MAX is 4096
MAX_DIM = 1 << 16
_META_MAX_BYTES = 1 << 30
_META_KEYS = {"format", "dim", "model", "sha256", "labels", "mac"}


def check_label(label: object) -> str:
    """A label, checked: a str of at most MAX_LABEL_CHARS characters that UTF-8 can encode."""
    if not isinstance(label, str):
        raise InvalidInputError(f"a label must be a str, got {type(label).__name__}")
    if len(label) > MAX_LABEL_CHARS:
        raise InvalidInputError(f"a label has {len(label)} characters; at most {MAX_LABEL_CHARS} are allowed")
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from undecodable bytes
        raise InvalidInputError(
            f"label {label[:80]!r} is not valid Unicode (it holds a lone surrogate)"
        ) from None
    return label


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
        if isinstance(id_, bool) or not isinstance(id_, (int, np.integer)) or not 0 <= id_ < FREE_KEY:
            return False  # not an id, so never in the index
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
        if n and int(arr.max()) >= FREE_KEY:  # usearch's empty-slot key: stored, never found
            raise InvalidInputError(f"ids must be below 2**64-1, got {int(arr.max())}")
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
        if labels is not None:
            if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)):
                raise InvalidInputError(f"labels must be a list of str, got {type(labels).__name__}")
            if len(labels) != len(keys):
                raise InvalidInputError(f"got {len(labels)} labels for {len(keys)} vectors")
            labels = [check_label(lab) for lab in labels]
        with self._lock:
            present = [int(k) for k in keys if self._index.contains(int(k))]
            if present:
                raise InvalidInputError(f"ids already in the index: {present[:10]}; remove them first")
            self._index.add(keys, v)
            if labels is not None:
                self._labels.update({int(k): lab for k, lab in zip(keys, labels)})

    def remove(self, ids: object) -> int:
        """Remove ids; returns how many were present."""
        if isinstance(ids, np.ndarray):
            items = ids.ravel().tolist()
        elif isinstance(ids, (int, np.integer)):
            items = [ids]
        else:
            try:
                items = list(ids)  # type: ignore[call-overload]
            except TypeError:
                raise InvalidInputError(f"ids must be integers, got {type(ids).__name__}") from None
        bad = [k for k in items if isinstance(k, bool) or not isinstance(k, (int, np.integer))]
        if bad:
            raise InvalidInputError(f"ids must be integers, got {type(bad[0]).__name__} {bad[0]!r:.40}")
        keys = [int(k) for k in items if 0 <= k < FREE_KEY]  # others are never present
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
        """Write the index directory atomically, with a MAC under this installation's key."""
        from mmedge.runtime.local_key import local_key, mac
        from mmedge.runtime.package import sha256_file
        from mmedge.runtime.staging import staged_dir

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
        idx = cls(meta["dim"], exact=exact, model=meta.get("model"))
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
