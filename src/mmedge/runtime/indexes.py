"""The vector index interface the retrieval pipeline talks to, the checks every implementation
shares, and index locations.

Two implementations: `index.VectorIndex` (usearch, embedded, the default) and
`milvus_index.MilvusIndex` (a Milvus Lite file, or a Milvus server or cluster). Both score by
cosine similarity (inner product of L2-normalised vectors), take integer ids from 0 to 2**64-2 and
an optional label per id. A location is one string (docs/indexes.md):

    DIR                                     usearch index directory
    milvus-lite://PATH.db[?collection=NAME]  Milvus Lite file (PATH relative; ///PATH absolute)
    milvus://HOST[:PORT][/COLLECTION][?db=NAME]      Milvus server or cluster (plain)
    milvus+tls://HOST[:PORT][/COLLECTION][?db=NAME]  the same over TLS

A Milvus token ("user:password" or an API key) comes from $MMEDGE_MILVUS_TOKEN, never from the
location: locations end up in logs, shell history and process lists.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import SplitResult, parse_qsl, urlsplit

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.usearch_file import FREE_KEY  # usearch's empty-slot key: no index takes it as an id

MAX_LABEL_CHARS = 4096  # a label is a name or a path; PATH_MAX is 4096
MILVUS_SCHEMES = ("milvus-lite", "milvus", "milvus+tls")
DEFAULT_COLLECTION = "mmedge"
DEFAULT_MILVUS_PORT = 19530
TOKEN_ENV = "MMEDGE_MILVUS_TOKEN"
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")  # Milvus's rule for collection names


@dataclass(frozen=True)
class Hit:
    id: int
    score: float  # cosine similarity
    label: str | None = None
    itm: float | None = None  # image-text match probability when re-ranked (RetrievalPipeline.search)


class Index(Protocol):
    """What the retrieval pipeline needs of a vector index."""

    dim: int
    model: str | None  # who embedded the vectors (RetrievalPipeline.model_id); None: not recorded

    def __len__(self) -> int: ...

    def __contains__(self, id_: int) -> bool: ...

    def add(self, ids: object, vectors: np.ndarray, labels: list[str] | None = None) -> None:
        """Add vectors under new ids (an id already present is an error, not an overwrite)."""
        ...

    def remove(self, ids: object) -> int:
        """Remove ids; returns how many were present."""
        ...

    def search(self, query: np.ndarray, k: int = 5) -> list[list[Hit]]:
        """Top-k hits per query row, best first."""
        ...

    def find_labels(self, labels: list[str]) -> dict[str, int]:
        """label -> id of those given labels that the index holds (e.g. image paths already added)."""
        ...

    def save(self) -> None:
        """Make every change durable at the index's location."""
        ...


# --- checks shared by the implementations ------------------------------------------------


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


def check_labels(labels: object, n: int) -> list[str] | None:
    """One checked label per vector, or None."""
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)):
        raise InvalidInputError(f"labels must be a list of str, got {type(labels).__name__}")
    if len(labels) != n:
        raise InvalidInputError(f"got {len(labels)} labels for {n} vectors")
    return [check_label(lab) for lab in labels]


def check_k(k: object) -> int:
    """The number of hits asked for, checked: a positive int."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InvalidInputError(f"k must be a positive int, got {k!r}")
    return int(k)


def check_ids(ids: object, n: int) -> np.ndarray:
    """`n` unique ids from 0 to 2**64-2 as uint64."""
    try:
        if isinstance(ids, (list, tuple)) and all(type(k) is int and 0 <= k < FREE_KEY for k in ids):
            arr = np.array(ids, np.uint64)  # numpy would make [5, 2**64 - 2] float64
        else:
            arr = np.asarray(ids)
    except (ValueError, TypeError):  # ragged or otherwise not array-like
        raise InvalidInputError(
            f"ids must be {n} non-negative integers, got a ragged {type(ids).__name__}"
        ) from None
    if arr.ndim != 1 or arr.shape[0] != n or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
        raise InvalidInputError(f"ids must be {n} non-negative integers, got {arr.dtype} shape {arr.shape}")
    if n and int(arr.max()) >= FREE_KEY:
        raise InvalidInputError(f"ids must be below 2**64-1, got {int(arr.max())}")
    if len(np.unique(arr)) != n:
        raise InvalidInputError("ids must be unique")
    return arr.astype(np.uint64)


def check_vectors(vectors: object, dim: int) -> np.ndarray:
    """(N, dim) finite float32, C-contiguous (one 1-D vector becomes one row)."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != dim:
        raise InvalidInputError(f"vectors must have shape (N, {dim}), got {v.shape}")
    if not np.isfinite(v).all():
        raise InvalidInputError("vectors contain NaN or infinity")
    return np.ascontiguousarray(v)


def removal_ids(ids: object) -> list[int]:
    """The ids a remove call names that could be in an index (others are never present)."""
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
    return sorted({int(k) for k in items if 0 <= k < FREE_KEY})


# --- locations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MilvusLocation:
    """Where a Milvus index lives: `uri` is what pymilvus connects to (a Milvus Lite file or a server)."""

    uri: str
    collection: str
    db: str | None = None
    lite: bool = False

    def __str__(self) -> str:
        return f"{self.uri} collection {self.collection}" + (f" (database {self.db})" if self.db else "")


def parse_location(location: str | os.PathLike[str]) -> Path | MilvusLocation:
    """A usearch directory (a plain path) or a Milvus location; InvalidInputError names what is wrong."""
    if isinstance(location, os.PathLike):
        return Path(location)
    if not isinstance(location, str) or not location or "\x00" in location:
        raise InvalidInputError(f"an index location must be a non-empty path or URI, got {location!r:.80}")
    scheme, sep, _ = location.partition("://")
    if not sep:
        return Path(location).expanduser()
    if scheme not in MILVUS_SCHEMES:  # a typo must not become a directory named "milvus-lit:"
        raise InvalidInputError(
            f"index URI scheme {scheme!r:.40} is not known; use a directory (usearch) or one of "
            + ", ".join(f"{s}://" for s in MILVUS_SCHEMES)
        )
    parts = urlsplit(location)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if scheme == "milvus-lite":
        return _lite_location(location, parts.netloc + parts.path, query)
    return _server_location(location, scheme, parts, query)


def _lite_location(location: str, path: str, query: dict[str, str]) -> MilvusLocation:
    _known_keys(location, query, {"collection"})
    if not path.endswith(".db") or path == ".db":  # Milvus Lite's own rule for a local file
        raise InvalidInputError(f"{location!r}: a Milvus Lite file name ends in .db (milvus-lite://PATH.db)")
    file = Path(path).expanduser().absolute()
    return MilvusLocation(str(file), _collection(location, query.get("collection")), lite=True)


def _server_location(location: str, scheme: str, parts: SplitResult, query: dict[str, str]) -> MilvusLocation:
    _known_keys(location, query, {"db"})
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError(
            f"{scheme}:// locations carry no credentials (they end up in logs); set ${TOKEN_ENV} to "
            "'user:password' or an API key instead"
        )
    try:
        host, port = parts.hostname, parts.port or DEFAULT_MILVUS_PORT
    except ValueError as exc:  # a port that is not a number in range
        raise InvalidInputError(f"{location!r}: {exc}") from None
    if not host:
        raise InvalidInputError(f"{location!r} names no host: {scheme}://HOST[:PORT][/COLLECTION]")
    name = parts.path.strip("/") or None
    db = query.get("db") or None
    if db is not None and not _COLLECTION_NAME.fullmatch(db):
        raise InvalidInputError(f"{location!r}: database name {db!r:.80} is not a valid Milvus name")
    host = f"[{host}]" if ":" in host else host  # an IPv6 literal
    web = "https" if scheme == "milvus+tls" else "http"
    return MilvusLocation(f"{web}://{host}:{port}", _collection(location, name), db=db)


def _known_keys(location: str, query: dict[str, str], known: set[str]) -> None:
    unknown = sorted(set(query) - known)
    if unknown:
        raise InvalidInputError(
            f"{location!r}: unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}"
        )


def _collection(location: str, name: str | None) -> str:
    if name is None:
        return DEFAULT_COLLECTION
    if not _COLLECTION_NAME.fullmatch(name):
        raise InvalidInputError(
            f"{location!r}: collection name {name!r:.80} is not valid (a letter or _, then letters, digits "
            "or _, at most 255)"
        )
    return name


def open_index(
    location: str | os.PathLike[str], dim: int, model: str | None = None, create: bool = True
) -> Index:
    """The index at a location (see the module docstring). An index that does not exist yet is
    created for `dim` and `model` when `create` (a usearch directory: on its first `save()`);
    otherwise that is an InvalidInputError."""
    where = parse_location(location)
    if isinstance(where, MilvusLocation):
        from mmedge.runtime.milvus_index import MilvusIndex

        return MilvusIndex.open(where, dim, model=model, create=create)
    from mmedge.runtime.index import VectorIndex

    if where.exists():
        return VectorIndex.load(where)
    if not create:
        raise InvalidInputError(f"index {str(where)!r} does not exist; adding to it creates it")
    return VectorIndex(dim, model=model, location=where)
