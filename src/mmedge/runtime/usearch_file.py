"""Read the keys and vectors out of a usearch index file without letting usearch parse it.

usearch trusts its files: a crafted HNSW graph (a neighbour slot out of range, a bad level) loads and
then reads out of bounds on `search`. For a file this installation did not write, only the parts
that need no trust are taken from it, the keys and the vectors, checked here with numpy; the graph
is ignored and rebuilt. Layout of a dense index saved by usearch 2 (little-endian):

    u32 rows, u32 bytes per vector, rows * bytes vector data (slot order)
    64-byte head: b"usearch", u16 major/minor/patch, u8 metric/scalar/key/slot kinds,
                  u64 count present, u64 count deleted, u64 dimensions, u8 multi, padding
    u64 size, u64 connectivity, u64 base connectivity, i64 max level, u64 entry slot
    i16 level of each of `size` nodes
    per node: u64 key, i16 level, then per level 0..level: u32 count + slots
              (base connectivity slots on level 0, connectivity slots above), u32 each

A deleted node keeps its slot with the free key 2**64-1.
"""

from __future__ import annotations

import struct

import numpy as np

from mmedge.errors import IntegrityError

FREE_KEY = 2**64 - 1  # usearch's marker of an empty slot; never a valid id
_MAGIC = b"usearch"
# The kinds mmedge's indexes use: cosine metric, f32 scalars, u64 keys, u32 slots.
_KINDS = (0x63, 0x0B, 0x0E, 0x0F)
_HEAD = struct.Struct("<7s3H4B3QB")
_GRAPH = struct.Struct("<3QqQ")
_MAX_CONNECTIVITY = 1 << 12
_MAX_LEVEL = 64


def read_usearch(raw: bytes, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys uint64 (N,), vectors float32 (N, dim)) of the live entries; IntegrityError if malformed."""
    if len(raw) < 8:
        raise _bad("shorter than its header")
    rows, row_bytes = struct.unpack_from("<II", raw, 0)
    if row_bytes != 4 * dim:
        raise _bad(f"holds {row_bytes}-byte vectors, not {dim} float32 values")
    off = 8 + rows * row_bytes
    if len(raw) < off + 64 + _GRAPH.size + 2 * rows:
        raise _bad("is truncated")
    magic, major, _, _, metric, scalar, key, slot, present, deleted, dims, multi = _HEAD.unpack_from(raw, off)
    if magic != _MAGIC or major != 2:
        raise _bad("is not a usearch 2 index")
    if (metric, scalar, key, slot) != _KINDS or dims != dim or multi:
        raise _bad("is not a cosine, float32, single-vector index with 64-bit keys")
    off += 64
    size, conn, conn_base, max_level, _ = _GRAPH.unpack_from(raw, off)
    off += _GRAPH.size
    if size != rows or present + deleted != rows:
        raise _bad(f"counts disagree (rows {rows}, nodes {size}, present {present}, deleted {deleted})")
    if not (0 < conn <= _MAX_CONNECTIVITY and 0 < conn_base <= _MAX_CONNECTIVITY and max_level < _MAX_LEVEL):
        raise _bad("has an implausible graph header")
    levels = np.frombuffer(raw, "<i2", rows, off).astype(np.int64)
    off += 2 * rows
    if rows and ((levels < 0).any() or (levels > max_level).any()):
        raise _bad("has a node level outside the graph's")
    node_bytes = 8 + 2 + 4 * (1 + conn_base) + levels * 4 * (1 + conn)
    ends = off + np.cumsum(node_bytes)
    if (ends[-1] if rows else off) != len(raw):
        raise _bad("does not end where its nodes do")
    starts = ends - node_bytes
    data = np.frombuffer(raw, np.uint8)
    keys = data[starts[:, None] + np.arange(8)].copy().view("<u8").ravel()
    if not (data[starts[:, None] + np.arange(8, 10)].copy().view("<i2").ravel() == levels).all():
        raise _bad("has nodes whose level differs from the level table")
    live = keys != np.uint64(FREE_KEY)
    if int(live.sum()) != present:
        raise _bad(f"has {int(live.sum())} live keys, not {present}")
    keys = keys[live]
    if len(np.unique(keys)) != len(keys):
        raise _bad("holds a key twice")
    vectors = np.frombuffer(raw, "<f4", rows * dim, 8).reshape(rows, dim)[live]
    if not np.isfinite(vectors).all():
        raise _bad("holds a vector with NaN or infinity")
    return keys.astype(np.uint64), np.ascontiguousarray(vectors, dtype=np.float32)


def _bad(what: str) -> IntegrityError:
    return IntegrityError(f"the usearch file {what}; rebuild the index")
