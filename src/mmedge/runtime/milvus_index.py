"""A vector index in a Milvus collection: a Milvus Lite file, or a Milvus server or cluster.

The same code talks to both through pymilvus (the `milvus` extra). A collection mmedge creates has
three fields, `id` (INT64 primary key), `vector` (FLOAT_VECTOR, an HNSW index with inner-product
metric) and `label` (nullable VARCHAR), strong consistency (a search sees every write before it),
and a collection property `mmedge.index` that records the format and the model that made the
vectors. Vectors are L2-normalised on the way in, so scores are cosine similarities, as usearch's.

Ids are 0 to 2**64-2 like every index's; Milvus keys are signed 64-bit, so an id from 2**63 up is
stored as id - 2**64 (two's complement: the same 64 bits) and read back unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import IndexServiceError, IntegrityError, InvalidInputError, require
from mmedge.runtime.indexes import (
    DEFAULT_MILVUS_PORT,
    FREE_KEY,
    MAX_LABEL_CHARS,
    TOKEN_ENV,
    Hit,
    MilvusLocation,
    check_ids,
    check_k,
    check_labels,
    check_vectors,
    removal_ids,
)

FORMAT = "mmedge.index/1"
PROPERTY = "mmedge.index"  # the collection property holding {"format", "model"}
MAX_K = 16384  # Milvus's largest topk
HNSW_BUILD = {"M": 16, "efConstruction": 200}
SEARCH_EF = (
    256  # HNSW search breadth (at least k): recall@10 >= 0.998 on 5,000 random 64-d vectors; 128: 0.991
)
_INT64_MIN = -(2**63)
_ROW_BYTES = 16 << 20  # vector bytes per insert request: far below gRPC's 64 MiB message cap
_IDS_PER_QUERY = 1000
_FILTER_CHARS = 1 << 16  # characters of label literals per query filter


def _pk(ids: np.ndarray) -> list[int]:
    """uint64 ids -> Milvus INT64 keys (the same 64 bits)."""
    return [int(k) for k in ids.astype(np.uint64).view(np.int64)]


def _id(pk: int) -> int:
    return pk + 2**64 if pk < 0 else pk


def _id_filter(pks: list[int]) -> str:
    """A filter matching these keys. -2**63 has no literal (9223372036854775808 overflows INT64)."""
    parts = []
    plain = [k for k in pks if k != _INT64_MIN]
    if plain:
        parts.append(f"id in [{', '.join(map(str, plain))}]")
    if len(plain) < len(pks):
        parts.append(f"id < {_INT64_MIN + 1}")
    return " or ".join(parts)


def _quote(text: str) -> str:
    """A Milvus filter string literal: the escapes both Milvus and Milvus Lite read."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def _normalised(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class MilvusIndex:
    """One Milvus collection as an `indexes.Index`. Writes are stored as they happen; `save()`
    flushes them into sealed segments (and, in Milvus Lite, builds the HNSW graph over them)."""

    def __init__(self, client: Any, where: MilvusLocation, dim: int, model: str | None):
        self.client, self.where = client, where
        self.collection = where.collection
        self.dim, self.model = dim, model
        self._lock = threading.RLock()  # an id's presence check and its insert are one step in this process

    def __repr__(self) -> str:
        return f"MilvusIndex({str(self.where)!r}, dim={self.dim})"

    @classmethod
    def open(
        cls, where: MilvusLocation, dim: int, model: str | None = None, create: bool = True
    ) -> MilvusIndex:
        """Connect and open the collection; create it for `dim` and `model` if missing and `create`."""
        pymilvus = require("pymilvus", "milvus")
        if where.lite:
            require("milvus_lite", "milvus")
            Path(where.uri).parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"uri": where.uri}
        token = os.environ.get(TOKEN_ENV)
        if token and not where.lite:
            kwargs["token"] = token
        if where.db:
            kwargs["db_name"] = where.db
        with _service(where, "cannot connect"):
            client = pymilvus.MilvusClient(**kwargs)
        index = cls(client, where, dim, model)
        with _service(where, "cannot open the collection"):
            exists = client.has_collection(where.collection)
            if not exists and not create:
                raise InvalidInputError(f"index {where} does not exist; adding to it creates it")
            if exists:
                index._adopt()
            else:
                index._create(pymilvus)
            client.load_collection(where.collection)
        return index

    def _create(self, pymilvus: Any) -> None:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=self.dim)
        # max_length counts bytes: room for MAX_LABEL_CHARS characters of up to 4 UTF-8 bytes
        schema.add_field("label", pymilvus.DataType.VARCHAR, max_length=4 * MAX_LABEL_CHARS, nullable=True)
        params = self.client.prepare_index_params()
        params.add_index(field_name="vector", index_type="HNSW", metric_type="IP", params=HNSW_BUILD)
        self.client.create_collection(
            self.collection,
            schema=schema,
            index_params=params,
            consistency_level="Strong",
            properties={PROPERTY: json.dumps({"format": FORMAT, "model": self.model})},
        )

    def _adopt(self) -> None:
        """Take dimension and model from an existing collection, refusing one mmedge did not make."""
        desc = self.client.describe_collection(self.collection)
        fields = {f["name"]: f for f in desc.get("fields", [])}
        try:
            meta = json.loads(desc.get("properties", {}).get(PROPERTY, ""))
            dim = int(fields["vector"]["params"]["dim"])
            ok = meta.get("format") == FORMAT and fields["id"].get("is_primary") and "label" in fields
            metric = self.client.describe_index(self.collection, "vector").get("metric_type")
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok or metric != "IP":
            raise IntegrityError(
                f"index {self.where}: the collection exists and is not an mmedge index "
                f"(no {PROPERTY} property, or other fields or metric); choose another collection name"
            )
        self.dim, self.model = dim, meta.get("model")

    # --- the Index interface ------------------------------------------------------------------

    def __len__(self) -> int:
        with _service(self.where, "cannot count entries"):
            rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def __contains__(self, id_: int) -> bool:
        if isinstance(id_, bool) or not isinstance(id_, (int, np.integer)) or not 0 <= id_ < FREE_KEY:
            return False
        return bool(self._present(_pk(np.array([id_], np.uint64))))

    def _present(self, pks: list[int]) -> list[int]:
        """Which of these keys the collection holds."""
        found: list[int] = []
        with _service(self.where, "cannot look ids up"):
            for i in range(0, len(pks), _IDS_PER_QUERY):
                chunk = pks[i : i + _IDS_PER_QUERY]
                rows = self.client.query(
                    self.collection, filter=_id_filter(chunk), output_fields=["id"], limit=len(chunk)
                )
                found += [int(r["id"]) for r in rows]
        return found

    def add(self, ids: object, vectors: np.ndarray, labels: list[str] | None = None) -> None:
        v = _normalised(check_vectors(vectors, self.dim))
        keys = check_ids(ids, v.shape[0])
        checked = check_labels(labels, len(keys))
        pks = _pk(keys)
        rows_per_call = max(1, _ROW_BYTES // (4 * self.dim))
        with self._lock:
            present = self._present(pks)
            if present:
                raise InvalidInputError(
                    f"ids already in the index: {[_id(k) for k in present[:10]]}; remove them first"
                )
            with _service(self.where, "cannot insert"):
                for i in range(0, len(pks), rows_per_call):
                    rows = [
                        {"id": pk, "vector": v[j].tolist(), "label": None if checked is None else checked[j]}
                        for j, pk in enumerate(pks[i : i + rows_per_call], start=i)
                    ]
                    self.client.insert(self.collection, rows)

    def remove(self, ids: object) -> int:
        pks = _pk(np.array(removal_ids(ids), np.uint64))
        with self._lock:
            present = self._present(pks)
            with _service(self.where, "cannot delete"):
                for i in range(0, len(present), _IDS_PER_QUERY):
                    self.client.delete(self.collection, ids=present[i : i + _IDS_PER_QUERY])
        return len(present)

    def search(self, query: np.ndarray, k: int = 5) -> list[list[Hit]]:
        check_k(k)
        if k > MAX_K:
            raise InvalidInputError(f"k is {k}; a Milvus index returns at most {MAX_K} hits a query")
        q = _normalised(check_vectors(query, self.dim))
        with _service(self.where, "cannot search"):
            results = self.client.search(
                self.collection,
                data=q.tolist(),
                limit=k,
                anns_field="vector",
                search_params={"metric_type": "IP", "params": {"ef": max(SEARCH_EF, k)}},
                output_fields=["label"],
            )
        return [
            [Hit(_id(int(r["id"])), float(r["distance"]), r["entity"].get("label")) for r in row]
            for row in results
        ]

    def find_labels(self, labels: list[str]) -> dict[str, int]:
        wanted = sorted(set(check_labels(list(labels), len(labels)) or []))
        out: dict[str, int] = {}
        with _service(self.where, "cannot look labels up"):
            for chunk in _label_chunks(wanted):
                rows = self.client.query(
                    self.collection,
                    filter=f"label in [{', '.join(map(_quote, chunk))}]",
                    output_fields=["id", "label"],
                    limit=MAX_K,
                )
                out.update({r["label"]: _id(int(r["id"])) for r in rows})
        return out

    def save(self) -> None:
        with _service(self.where, "cannot flush"):
            self.client.flush(self.collection)

    def close(self) -> None:
        """Close the connection (a Milvus Lite file is released for other processes)."""
        with _service(self.where, "cannot close"):
            self.client.close()


def _label_chunks(labels: list[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for label in labels:
        if chunk and (size + len(label) > _FILTER_CHARS or len(chunk) >= _IDS_PER_QUERY):
            yield chunk
            chunk, size = [], 0
        chunk.append(label)
        size += len(label)
    if chunk:
        yield chunk


@contextlib.contextmanager
def _service(where: MilvusLocation, what: str) -> Iterator[None]:
    """Milvus's own errors as IndexServiceError naming the index (the service's reason kept)."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as exc:
        hint = (
            f" (is a Milvus server listening there? default port {DEFAULT_MILVUS_PORT})"
            if exc.code == 2
            else ""
        )
        raise IndexServiceError(f"index {where}: {what}: {exc.message}{hint}"[:1000]) from None
