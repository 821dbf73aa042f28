"""Single-channel maps for ImageBind's depth and thermal encoders (torch-free, numpy only).

Both become (1, S, S) float32: the shortest side resized to S with an antialiased bilinear
(triangle) filter, which is what torchvision's `Resize` does to a float tensor and PIL's BILINEAR
does to an image, then the centre S x S square (torchvision's `CenterCrop` offsets), then
(x - mean) / std.

Depth: ImageBind's depth encoder takes disparity, not depth (the paper follows Omnivore: depth is
converted to disparity "for scale normalisation"). ImageBind's released code has no depth loader,
so the constants are Omnivore's, the same authors' RGB-D pipeline that ImageBind's depth data
follows (omnivore/predict.py): disparity clamped to [0.01, 75], divided by 75, resized and cropped,
then normalised with mean 0.0418 and std 0.0295. `depth_to_disparity` converts metric depth with
disparity = baseline x focal / depth (Omnivore's SUN RGB-D conversion: Kinect baseline 0.075 m,
depth clipped to [0.01, 50] m).

Thermal: ImageBind's released code has no thermal loader either; the map is scaled to [0, 1] (by
its dtype's range, or by its own min and max) and, by default, not normalised further (mean 0,
std 1), which is torchvision's `ToTensor` on LLVIP's 8-bit thermal images.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmedge.errors import ConfigError, InvalidInputError, require_opencv
from mmedge.runtime.arrays import check_finite, real_array
from mmedge.runtime.image_headers import HeaderError, read_header, sniff_format

__all__ = [
    "DepthConfig",
    "MapLimits",
    "ThermalConfig",
    "depth_to_disparity",
    "load_map_png",
    "preprocess_depth",
    "preprocess_thermal",
    "resize_map",
]

_MAX_SIZE = 4096  # as sections.MAX_IMAGE_SIZE


@dataclass(frozen=True)
class MapLimits:
    """Caps on a single-channel map: `max_pixels` is checked from an array's shape or a PNG's
    header before any work; `max_bytes` bounds a PNG file (a 16-bit 7000 x 7000 map is ~100 MB raw)."""

    max_pixels: int = 50_000_000
    max_bytes: int = 100 * 1024 * 1024


def _check_size(value: Any, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIZE:
        raise ConfigError(f"{owner}.image_size must be an int in [1, {_MAX_SIZE}], got {value!r}")


def _check_mean_std(mean: Any, std: Any, owner: str) -> None:
    for name, value in (("mean", mean), ("std", std)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{owner}.{name} must be a finite number, got {value!r}")
    if std <= 0:
        raise ConfigError(f"{owner}.std must be positive, got {std!r}")


@dataclass(frozen=True)
class DepthConfig:
    """Disparity -> clamp to [min_disparity, max_disparity], divide by max_disparity, resize,
    centre-crop to image_size, (x - mean) / std. Defaults: Omnivore's RGB-D constants."""

    image_size: int = 224
    min_disparity: float = 0.01
    max_disparity: float = 75.0
    mean: float = 0.0418
    std: float = 0.0295

    def __post_init__(self) -> None:
        _check_size(self.image_size, "DepthConfig")
        _check_mean_std(self.mean, self.std, "DepthConfig")
        lo, hi = self.min_disparity, self.max_disparity
        finite = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)
        )
        if not finite or not 0 <= lo < hi:
            raise ConfigError(
                f"DepthConfig needs 0 <= min_disparity < max_disparity, finite; got {lo!r}, {hi!r}"
            )


@dataclass(frozen=True)
class ThermalConfig:
    """`scale`: "dtype" maps uint8 by 1/255, uint16 by 1/65535 and takes floats as already in
    [0, 1]; "minmax" stretches each map's own range to [0, 1] (raw radiometric 14/16-bit frames).
    Then resize, centre-crop, (x - mean) / std."""

    image_size: int = 224
    mean: float = 0.0
    std: float = 1.0
    scale: str = "dtype"

    def __post_init__(self) -> None:
        _check_size(self.image_size, "ThermalConfig")
        _check_mean_std(self.mean, self.std, "ThermalConfig")
        if self.scale not in ("dtype", "minmax"):
            raise ConfigError(
                f"ThermalConfig.scale={self.scale!r} is not supported; accepted: 'dtype', 'minmax'"
            )


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _map_array(x: Any, what: str, limits: MapLimits) -> np.ndarray:
    """A real (H, W) array within the pixel cap (from its shape), or a typed error."""
    x = real_array(x, what)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[:, :, 0]
    if x.ndim != 2:
        raise InvalidInputError(
            f"{what} has shape {x.shape}; expected a single-channel (H, W) or (H, W, 1) map"
        )
    height, width = x.shape
    if height == 0 or width == 0:
        raise InvalidInputError(f"{what} has zero size {x.shape}")
    if height * width > limits.max_pixels:
        raise InvalidInputError(
            f"{what} is {width}x{height} = {height * width} pixels; the limit is MapLimits.max_pixels={limits.max_pixels}"
        )
    return x


def load_map_png(src: str | os.PathLike[str] | bytes, limits: MapLimits = MapLimits()) -> np.ndarray:
    """A single-channel 8- or 16-bit PNG (a path or its bytes) -> (H, W) uint8 or uint16, as stored.

    Size and pixel caps are checked from the file size and PNG header before decoding.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        data = _read_file(os.fspath(src), limits)
    else:
        raise InvalidInputError(f"cannot load a map PNG from {type(src).__name__}; accepted: a path or bytes")
    if len(data) > limits.max_bytes:
        raise InvalidInputError(
            f"map PNG is {len(data)} bytes; the limit is MapLimits.max_bytes={limits.max_bytes}"
        )
    if sniff_format(data) != "png":
        raise InvalidInputError("map data is not a PNG; depth and thermal files are accepted as 8/16-bit PNG")
    try:
        header = read_header(data, "png")
    except HeaderError as exc:
        raise InvalidInputError(f"corrupt or truncated PNG: {exc}") from exc
    pixels = header.width * header.height
    if pixels == 0:
        raise InvalidInputError(f"PNG has zero size ({header.width}x{header.height})")
    if pixels > limits.max_pixels:
        raise InvalidInputError(
            f"PNG is {header.width}x{header.height} = {pixels} pixels; "
            f"the limit is MapLimits.max_pixels={limits.max_pixels}"
        )
    if header.bytes_per_pixel > 2:  # from the IHDR colour type: grey only
        raise InvalidInputError(
            "PNG has colour or alpha channels; a depth or thermal map must be single-channel grey"
        )
    cv2 = require_opencv()
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise InvalidInputError(f"corrupt or truncated PNG: {exc}") from exc
    if raw is None or raw.ndim != 2 or raw.dtype not in (np.uint8, np.uint16):
        raise InvalidInputError(
            "corrupt or truncated PNG: the decoder rejected it or did not give one grey channel"
        )
    return np.asarray(raw)


def _read_file(path: str, limits: MapLimits) -> bytes:
    if "\x00" in path:
        raise InvalidInputError("map path contains a NUL character")
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(f"map path {path!r} is not a regular file")
        if info.st_size > limits.max_bytes:
            raise InvalidInputError(
                f"map file {path!r} is {info.st_size} bytes; the limit is MapLimits.max_bytes={limits.max_bytes}"
            )
        with open(path, "rb") as f:
            return f.read(limits.max_bytes + 1)  # the file may grow after stat; the caller re-checks
    except (OSError, UnicodeEncodeError) as exc:
        raise InvalidInputError(f"cannot read map file {path[:200]!r}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------


def depth_to_disparity(
    depth: np.ndarray,
    *,
    focal_px: float,
    baseline_m: float = 0.075,
    min_depth: float = 0.01,
    max_depth: float = 50.0,
    limits: MapLimits = MapLimits(),
) -> np.ndarray:
    """(H, W) metric depth (metres) -> float32 disparity = baseline_m x focal_px / depth.

    Depth is clipped to [min_depth, max_depth] first; pixels with no reading (depth <= 0, as
    sensors store holes) get disparity 0, "infinitely far", instead of the nearest value a plain
    clip would give them. focal_px: the camera's focal length in pixels of this map.
    """
    for name, value in (("focal_px", focal_px), ("baseline_m", baseline_m), ("min_depth", min_depth)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise InvalidInputError(
                f"depth_to_disparity: {name} must be a positive finite number, got {value!r}"
            )
    if not (isinstance(max_depth, (int, float)) and min_depth < max_depth < math.inf):
        raise InvalidInputError(
            f"depth_to_disparity: max_depth must be finite and > min_depth, got {max_depth!r}"
        )
    d = _map_array(depth, "depth map", limits)
    check_finite(d, "depth map")
    d = d.astype(np.float64)
    disparity = (baseline_m * focal_px) / np.clip(d, min_depth, max_depth)
    disparity[d <= 0] = 0.0
    return disparity.astype(np.float32)


def preprocess_depth(
    src: np.ndarray | str | os.PathLike[str] | bytes,
    cfg: DepthConfig = DepthConfig(),
    *,
    focal_px: float | None = None,
    baseline_m: float = 0.075,
    png_scale: float = 0.001,
    limits: MapLimits = MapLimits(),
) -> np.ndarray:
    """A disparity map -> (1, S, S) float32 for ImageBind's depth encoder.

    `src`: an (H, W) real array, or a single-channel 8/16-bit PNG (path or bytes) whose values
    times `png_scale` give the map (default 0.001: millimetres -> metres). Without `focal_px` the
    map is disparity; with it, the map is metric depth in metres, converted by `depth_to_disparity`.
    """
    if isinstance(src, np.ndarray):
        x = _map_array(src, "depth map", limits)
    else:
        x = load_map_png(src, limits).astype(np.float32) * np.float32(png_scale)
    if focal_px is not None:
        x = depth_to_disparity(x, focal_px=focal_px, baseline_m=baseline_m, limits=limits)
    check_finite(x, "depth map")

    def depth_norm(window: np.ndarray) -> np.ndarray:  # Omnivore's DepthNorm, before the resize as there
        return np.clip(window.astype(np.float32), cfg.min_disparity, cfg.max_disparity) / np.float32(
            cfg.max_disparity
        )

    out = resize_map(x, cfg.image_size, depth_norm)
    out -= np.float32(cfg.mean)
    out /= np.float32(cfg.std)
    return out[None]


# ---------------------------------------------------------------------------------------------
# Thermal
# ---------------------------------------------------------------------------------------------


def preprocess_thermal(
    src: np.ndarray | str | os.PathLike[str] | bytes,
    cfg: ThermalConfig = ThermalConfig(),
    *,
    limits: MapLimits = MapLimits(),
) -> np.ndarray:
    """A thermal frame -> (1, S, S) float32 for ImageBind's thermal encoder.

    `src`: an (H, W) uint8, uint16 or float array, or a single-channel 8/16-bit PNG (path or bytes).
    With cfg.scale="dtype" a float array must already lie in [0, 1].
    """
    x = _map_array(src, "thermal map", limits) if isinstance(src, np.ndarray) else load_map_png(src, limits)
    if x.dtype.kind in "iu" and x.dtype not in (np.uint8, np.uint16):
        raise InvalidInputError(f"thermal map has dtype {x.dtype}; accepted: uint8, uint16, float16/32/64")
    check_finite(x, "thermal map")
    if cfg.scale == "minmax":
        lo, hi = float(x.min()), float(x.max())
        offset, factor = lo, (1.0 / (hi - lo) if hi > lo else 1.0)
    elif x.dtype.kind == "u":
        offset, factor = 0.0, 1.0 / float(np.iinfo(x.dtype).max)
    else:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidInputError(
                f"float thermal map has values in [{lo}, {hi}]; accepted range is [0, 1] "
                "(or use ThermalConfig(scale='minmax'))"
            )
        offset, factor = 0.0, 1.0

    def to_unit(window: np.ndarray) -> np.ndarray:
        return (window.astype(np.float32) - np.float32(offset)) * np.float32(factor)

    out = resize_map(x, cfg.image_size, to_unit)
    out -= np.float32(cfg.mean)
    out /= np.float32(cfg.std)
    return out[None]


# ---------------------------------------------------------------------------------------------
# Resize: shortest side to S with an antialiased triangle filter, then the centre square
# ---------------------------------------------------------------------------------------------


def resize_map(x: np.ndarray, size: int, pre: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(H, W) real map -> new (size, size) float32: shortest side to `size` (long side floored, as
    torchvision's Resize), antialiased bilinear, then the centre square (torchvision's CenterCrop:
    offset round((new - size) / 2)). Only the source rows and columns under the square are read,
    and `pre` (a pointwise map, e.g. a clamp) is applied to those alone, before resampling."""
    height, width = x.shape
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    rows = _triangle_taps(height, new_h, top, size)
    cols = _triangle_taps(width, new_w, left, size)
    window = x[_span(rows), _span(cols)]
    if pre is not None:
        window = pre(window)
    out = _resample_axis0(window, rows)  # (size, W')
    out = _resample_axis0(out.T, cols).T  # (size, size)
    return np.ascontiguousarray(out, dtype=np.float32)


def _span(taps: tuple[np.ndarray, np.ndarray]) -> slice:
    start, weights = taps
    return slice(int(start[0]), int(start[-1]) + weights.shape[1])


def _triangle_taps(in_size: int, out_size: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps (start (count,), weights (count, ksize)) of an antialiased bilinear resize for output
    pixels [first, first + count): PIL's and torch's (antialias=True) triangle filter, whose support
    widens with the shrink factor; weights past a pixel's window are 0."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # bilinear: half-width 1, times the shrink factor
    ksize = math.ceil(support) * 2 + 1
    center = (np.arange(first, first + count) + 0.5) * scale
    start = np.maximum((center - support + 0.5).astype(np.int64), 0)
    taps = np.minimum((center + support + 0.5).astype(np.int64), in_size) - start
    offset = np.arange(ksize)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs((offset + start[:, None] - center[:, None] + 0.5) / filterscale))
    w = np.where(offset < taps[:, None], w, 0.0)
    return start, w / w.sum(axis=1, keepdims=True)


def _resample_axis0(x: np.ndarray, taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """out[o] = sum_t weights[o, t] * x[start[o] - start[0] + t] along axis 0 (x starts at start[0])."""
    start, weights = taps
    rel = start - start[0]
    last = x.shape[0] - 1
    out = np.zeros((weights.shape[0], x.shape[1]), np.float64)
    for t in range(weights.shape[1]):  # one multiply-add per tap over whole rows
        out += weights[:, t : t + 1] * x[np.minimum(rel + t, last)]
    return out
