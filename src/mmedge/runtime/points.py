"""Point clouds for Meta-Transformer's point tokenizer (torch-free, numpy only).

Meta-Transformer's point-cloud tokenizer (openpoints' PointPatchEmbed with subsample='fps',
group='knn', feature_type='dp') picks group centres by farthest point sampling, gathers each
centre's k nearest points, and expresses them relative to their centre; a small convolution then
turns each group into one token. `group_points` does the geometric part here, so the exported
tokenizer only sees fixed-shape (G, K, C) neighbourhoods and (G, 3) centres:

1. optionally centre the cloud on its centroid and scale it into the unit sphere (the usual
   ModelNet40 normalisation: PointNet's released ModelNet40 point files come that way);
2. farthest point sampling of G centres, starting from point 0 (as pointnet2's CUDA kernel that
   Meta-Transformer uses: deterministic, no random start);
3. the K nearest points of each centre (a centre is its own nearest neighbour), nearest first,
   ties broken by the lower point index;
4. neighbour xyz minus centre xyz; extra channels (colour, normals) appended either as they are
   (Meta-Transformer's 'dp_fj') or minus the centre's ('dp_df').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mmedge.errors import ConfigError, InvalidInputError
from mmedge.runtime.arrays import check_finite, real_array

__all__ = [
    "PointConfig",
    "PointGroups",
    "PointLimits",
    "farthest_point_sample",
    "group_points",
    "knn_indices",
    "normalize_unit_sphere",
]

_KNN_BLOCK = 1 << 22  # distance entries computed at once (centres x points): 32 MiB in float64


@dataclass(frozen=True)
class PointConfig:
    """`groups` (G) centres of `group_size` (K) points each; `features`: how channels after xyz
    enter a neighbourhood, "raw" or "relative" (minus the centre's)."""

    groups: int = 64
    group_size: int = 32
    normalize: bool = True
    features: str = "raw"

    def __post_init__(self) -> None:
        for name in ("groups", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 16:
                raise ConfigError(f"PointConfig.{name} must be an int in [1, {1 << 16}], got {value!r}")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"PointConfig.normalize must be a bool, got {self.normalize!r}")
        if self.features not in ("raw", "relative"):
            raise ConfigError(
                f"PointConfig.features={self.features!r} is not supported; accepted: 'raw', 'relative'"
            )


@dataclass(frozen=True)
class PointLimits:
    """Caps checked from the array's shape before any work: `max_points` rows, `max_channels`
    columns (xyz plus extras: 3 for xyz, 6 for xyz + rgb or normals)."""

    max_points: int = 1_000_000
    max_channels: int = 16


class PointGroups(NamedTuple):
    """`neighbourhoods`: (G, K, C) float32, each point relative to its group's centre;
    `centres`: (G, 3) float32 group centres, in the (normalised) cloud's frame."""

    neighbourhoods: np.ndarray
    centres: np.ndarray


def group_points(
    points: np.ndarray, cfg: PointConfig = PointConfig(), limits: PointLimits = PointLimits()
) -> PointGroups:
    """(N, C) cloud, C >= 3 (xyz first) -> G neighbourhoods of K points relative to their centres."""
    points = _checked(points, cfg, limits)
    xyz = points[:, :3].astype(np.float64)
    if cfg.normalize:
        xyz = normalize_unit_sphere(xyz)
    centre_idx = farthest_point_sample(xyz, cfg.groups)
    centres = xyz[centre_idx]  # (G, 3)
    neighbours = knn_indices(xyz, centres, cfg.group_size)  # (G, K)
    out = np.empty((cfg.groups, cfg.group_size, points.shape[1]), np.float32)
    out[..., :3] = xyz[neighbours] - centres[:, None, :]
    if points.shape[1] > 3:
        extra = points[:, 3:]
        grouped = extra[neighbours].astype(np.float64)  # (G, K, C - 3)
        if cfg.features == "relative":
            grouped -= extra[centre_idx][:, None, :]
        out[..., 3:] = grouped
    return PointGroups(out, centres.astype(np.float32))


def _checked(points: np.ndarray, cfg: PointConfig, limits: PointLimits) -> np.ndarray:
    points = real_array(points, "point cloud")
    if points.ndim != 2 or points.shape[1] < 3:
        raise InvalidInputError(
            f"point cloud has shape {points.shape}; expected (N, 3) xyz or (N, 3 + F) xyz with F extra "
            "channels such as rgb or normals, e.g. (N, 6)"
        )
    count, channels = points.shape
    if count > limits.max_points:
        raise InvalidInputError(
            f"point cloud has {count} points; the limit is PointLimits.max_points={limits.max_points}"
        )
    if channels > limits.max_channels:
        raise InvalidInputError(
            f"point cloud has {channels} channels; the limit is PointLimits.max_channels={limits.max_channels}"
        )
    if count < cfg.group_size:
        raise InvalidInputError(
            f"point cloud has {count} points; PointConfig.group_size={cfg.group_size} needs at least that many"
        )
    if count < cfg.groups:
        raise InvalidInputError(
            f"point cloud has {count} points; PointConfig.groups={cfg.groups} centres need at least that many"
        )
    check_finite(points, "point cloud")
    return points


def normalize_unit_sphere(xyz: np.ndarray) -> np.ndarray:
    """(N, 3) -> float64 copy centred on its centroid and scaled so the farthest point is at
    distance 1 (unchanged scale when every point is the same)."""
    out = np.asarray(xyz, np.float64) - np.asarray(xyz, np.float64).mean(axis=0)
    radius = float(np.sqrt(_sq_dist(out.T, np.zeros(3)).max()))
    if radius > 0:
        out /= radius
    return out


def _sq_dist(cols: np.ndarray, point: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Squared distances from each column of (3, N) `cols` to one point, summed x, y, z in that order."""
    d = np.subtract(cols[0], point[0], out=out)
    np.square(d, out=d)
    tmp = np.empty_like(d)
    for axis in (1, 2):
        np.subtract(cols[axis], point[axis], out=tmp)
        d += np.square(tmp, out=tmp)
    return d


def farthest_point_sample(xyz: np.ndarray, count: int, start: int = 0) -> np.ndarray:
    """Indices (count,) int64 of greedy farthest point sampling over (N, 3) `xyz`.

    The first index is `start`; each next one is the point whose distance to the chosen set is
    largest (the lowest index on a tie). Loops over the `count` picks, vectorised over points.
    """
    pts = np.asarray(xyz, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or not 1 <= count <= pts.shape[0] or not 0 <= start < pts.shape[0]:
        raise InvalidInputError(
            f"farthest_point_sample needs (N, 3) points, 1 <= count <= N and 0 <= start < N; "
            f"got {pts.shape}, count={count}, start={start}"
        )
    cols = np.ascontiguousarray(pts.T)  # (3, N): each coordinate contiguous
    chosen = np.empty(count, np.int64)
    chosen[0] = start
    nearest = np.full(pts.shape[0], np.inf)  # squared distance of each point to the chosen set
    dist = np.empty(pts.shape[0])
    for i in range(1, count):
        np.minimum(nearest, _sq_dist(cols, pts[chosen[i - 1]], out=dist), out=nearest)
        chosen[i] = int(np.argmax(nearest))  # argmax: the first of equal maxima
    return chosen


def knn_indices(xyz: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) int64: for each of (Q, 3) `queries`, its `k` nearest rows of (N, 3) `xyz`, nearest
    first and, among equal distances, lower index first (a full stable argsort, without sorting all N)."""
    pts = np.asarray(xyz, np.float64)
    q = np.asarray(queries, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or q.ndim != 2 or q.shape[1] != 3 or not 1 <= k <= pts.shape[0]:
        raise InvalidInputError(
            f"knn_indices needs (N, 3) points, (Q, 3) queries and 1 <= k <= N; got {pts.shape}, {q.shape}, k={k}"
        )
    out = np.empty((q.shape[0], k), np.int64)
    cols = np.ascontiguousarray(pts.T)  # (3, N)
    block = max(1, _KNN_BLOCK // pts.shape[0])
    stride = max(1, min(64, pts.shape[0] // k))
    for first in range(0, q.shape[0], block):
        chunk = q[first : first + block]
        d = np.empty((chunk.shape[0], pts.shape[0]))
        for row, query in enumerate(chunk):
            _sq_dist(cols, query, out=d[row])
        # A bound on each row's k-th smallest distance from every `stride`-th point (the k-th of a
        # subset is never below the k-th of all); only points within it are candidates.
        bound = np.partition(d[:, ::stride], k - 1, axis=1)[:, k - 1]
        for row in range(chunk.shape[0]):  # one centre at a time
            cand = np.flatnonzero(d[row] <= bound[row])  # ascending indices, at least k of them
            dist = d[row, cand]
            if len(cand) > k:  # keep those within the exact k-th distance (ties at it included)
                keep = dist <= np.partition(dist, k - 1)[k - 1]
                cand, dist = cand[keep], dist[keep]
            out[first + row] = cand[np.argsort(dist, kind="stable")[:k]]
    return out
