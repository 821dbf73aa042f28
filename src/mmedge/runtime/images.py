"""Image loading and CLIP-style preprocessing (torch-free, PIL-free: numpy + OpenCV).

`load_image` makes one (H, W, 3) uint8 RGB array from a path, bytes, an array or a PIL image, with
byte and pixel caps checked from the header before decoding. `preprocess` matches transformers'
CLIPImageProcessor bit for bit: PIL's fixed-point bicubic resize is reproduced exactly.
OpenCV is imported on first use (`require_opencv`): from the `images` extra or the platform's own.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmedge.errors import ConfigError, InvalidInputError, require_opencv
from mmedge.runtime.image_headers import FORMATS, HeaderError, apply_orientation, read_header, sniff_format
from mmedge.runtime.sections import CLIP_MEAN, CLIP_STD, PreprocessConfig

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageLimits",
    "PreprocessConfig",
    "load_image",
    "normalise",
    "preprocess",
    "resize_bicubic",
]


@dataclass(frozen=True)
class ImageLimits:
    """Caps applied to every image before it is decoded.

    `max_decoded_bytes` bounds what the decoder allocates (pixels x channels x sample size, so a
    16-bit RGBA PNG counts 8 bytes a pixel); `max_jpeg_scans` bounds a progressive JPEG's passes.
    """

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 50_000_000
    formats: tuple[str, ...] = FORMATS
    max_decoded_bytes: int = 256 * 1024 * 1024  # a 50-megapixel RGBA image fits
    max_jpeg_scans: int = 64  # libjpeg's progressive script has 10; a bomb has thousands

    def __post_init__(self) -> None:
        if not set(self.formats) <= set(FORMATS):
            raise ConfigError(f"image formats {self.formats} are not all supported; accepted: {FORMATS}")


def load_image(src: Any, *, channel_order: str = "RGB", limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Load a path, encoded bytes, array or PIL image as a new (H, W, 3) uint8 RGB array.

    `channel_order` ("RGB"/"BGR") describes array input only. EXIF orientation is applied, only
    an animation's first frame is used, and transparency is blended onto white (as transformers).
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(bytes(src), limits)
    if isinstance(src, (str, os.PathLike)):
        return _decode(_read_file(os.fspath(src), limits), limits)
    if isinstance(src, np.ndarray):
        return _from_array(src, channel_order, limits)
    if hasattr(src, "mode") and hasattr(src, "convert"):
        return _from_pil(src, limits)
    accepted = "a path, bytes, a numpy array (H, W), (H, W, 3) or (H, W, 4), or a PIL image"
    raise InvalidInputError(f"cannot load an image from {type(src).__name__}; accepted: {accepted}")


def _read_file(path: str, limits: ImageLimits) -> bytes:
    if "\x00" in path:  # os.stat would raise a bare ValueError
        raise InvalidInputError("image path contains a NUL character")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as exc:  # a lone surrogate has no file-system spelling
        raise InvalidInputError(f"image path {path[:200]!r} is not valid Unicode: {exc.reason}") from None
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(f"image path {path!r} is not a regular file")
        _check_bytes(info.st_size, limits)
        with open(path, "rb") as f:
            return f.read(limits.max_bytes + 1)  # the file may grow after stat; _decode re-checks
    except OSError as exc:
        raise InvalidInputError(f"cannot read image file {path!r}: {exc.strerror or exc}") from exc


def _check_bytes(size: int, limits: ImageLimits) -> None:
    if size == 0:
        raise InvalidInputError("image is empty (0 bytes)")
    if size > limits.max_bytes:
        raise InvalidInputError(f"image is {size} bytes; the limit is {limits.max_bytes} bytes")


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        cap = limits.max_pixels
        raise InvalidInputError(f"image is {width}x{height} = {width * height} pixels; the cap is {cap}")


def _decode(data: bytes, limits: ImageLimits) -> np.ndarray:
    _check_bytes(len(data), limits)
    fmt = sniff_format(data)
    if fmt is None or fmt not in limits.formats:
        what = "an unknown format" if fmt is None else f"{fmt}, which is not enabled"
        raise InvalidInputError(f"image data is {what}; accepted formats: {', '.join(limits.formats)}")
    try:
        header = read_header(data, fmt)
    except HeaderError as exc:
        raise InvalidInputError(f"corrupt or truncated {fmt} image: {exc}") from exc
    _check_pixels(header.width, header.height, limits)
    if header.decoded_bytes > limits.max_decoded_bytes:
        raise InvalidInputError(
            f"{fmt} image of {header.width}x{header.height} decodes to {header.decoded_bytes} bytes "
            f"({header.bytes_per_pixel} a pixel); the limit is {limits.max_decoded_bytes} bytes"
        )
    if header.scans > limits.max_jpeg_scans:
        raise InvalidInputError(
            f"JPEG has {header.scans} scans; the limit is {limits.max_jpeg_scans} "
            "(each scan is one more decoding pass over the whole image)"
        )
    cv2 = require_opencv()
    try:  # IMREAD_UNCHANGED keeps alpha and skips OpenCV's own EXIF handling: we rotate below
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise InvalidInputError(f"corrupt or truncated {fmt} image: {exc}") from exc
    if raw is None or raw.size == 0:
        raise InvalidInputError(f"corrupt or truncated {fmt} image: the decoder rejected it")
    _check_pixels(raw.shape[1], raw.shape[0], limits)  # in case the decoder disagrees with the header
    # 16-bit PNG (the only deeper case in FORMATS) keeps the high byte, as OpenCV's own 8-bit decode
    return np.ascontiguousarray(apply_orientation(_to_rgb(raw, "BGR"), header.orientation))


def _to_rgb(arr: np.ndarray, order: str) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 (or uint16: high byte) in `order` -> new
    (H, W, 3) uint8 RGB array, converted in bands of rows so temporaries stay small next to the image."""
    out = np.empty((arr.shape[0], arr.shape[1], 3), np.uint8)
    step = max(1, _BAND_PIXELS // max(arr.shape[1], 1))
    for top in range(0, arr.shape[0], step):
        out[top : top + step] = _rgb_band(arr[top : top + step], order)
    return out


def _rgb_band(arr: np.ndarray, order: str) -> np.ndarray:
    if arr.dtype == np.uint16:
        arr = np.right_shift(arr, 8).astype(np.uint8)
    if arr.ndim == 2 or arr.shape[2] == 1:
        return arr.reshape(arr.shape[0], arr.shape[1], 1)  # broadcast to 3 channels by the caller
    rgb = arr[..., 2::-1] if order == "BGR" else arr[..., :3]
    if arr.shape[2] == 3:
        return rgb
    # Blend onto white in integers: (c*a + 255*(255-a) + 127) // 255 == round(c*a/255 + 255*(1-a/255)).
    alpha = arr[..., 3:4].astype(np.uint16)
    blended = rgb.astype(np.uint16) * alpha
    blended += 255 * (255 - alpha) + 127
    blended //= 255
    return blended


_BAND_PIXELS = 1 << 20  # pixels per band of a conversion to RGB


def _from_array(arr: np.ndarray, order: str, limits: ImageLimits) -> np.ndarray:
    if order not in ("RGB", "BGR"):
        raise InvalidInputError(f"channel_order {order!r} is not accepted; use 'RGB' or 'BGR'")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InvalidInputError(f"image array has shape {arr.shape}; accepted: (H, W) or (H, W, 1|3|4)")
    _check_pixels(arr.shape[1], arr.shape[0], limits)
    if arr.dtype in (np.float32, np.float64):
        if not np.isfinite(arr).all():
            raise InvalidInputError("image array contains NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidInputError(f"float image array has values in [{lo}, {hi}]; accepted range is [0, 1]")
        arr = np.rint(arr * 255.0).astype(np.uint8)  # nearest level (transformers truncates)
    elif arr.dtype != np.uint8:
        raise InvalidInputError(f"image array dtype {arr.dtype}; accepted: uint8, float32/64 in [0, 1]")
    return _to_rgb(arr, order)  # always a new array, never a view of the caller's


def _from_pil(img: Any, limits: ImageLimits) -> np.ndarray:
    width, height = img.size
    _check_pixels(width, height, limits)
    frame = img.tell() if hasattr(img, "tell") else 0
    try:
        if frame:
            img.seek(0)  # first frame of an animation; restored below
        from PIL import ImageOps  # present whenever a PIL image is: only reached for one

        upright = ImageOps.exif_transpose(img)
        if "A" in upright.getbands() or upright.info.get("transparency") is not None:
            return _to_rgb(np.asarray(upright.convert("RGBA")), "RGB")
        return np.array(upright.convert("RGB"), dtype=np.uint8, order="C")
    except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for broken or truncated files
        raise InvalidInputError(f"corrupt or truncated PIL image: {exc}") from exc
    finally:
        if frame:
            img.seek(frame)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) RGB image."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidInputError("encode_png takes a uint8 (H, W, 3) RGB array")
    cv2 = require_opencv()
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))  # OpenCV writes BGR
    if not ok:
        raise InvalidInputError(f"OpenCV could not encode a {rgb.shape} image as PNG")
    return data.tobytes()


def preprocess(images: Sequence[np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    """Resize (shortest side + centre crop, or "exact" to S x S), rescale, normalise -> (N, 3, S, S) float32."""
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise InvalidInputError("preprocess takes a list of (H, W, 3) images, not a single array")
    if len(images) == 0:
        raise InvalidInputError("preprocess got no images")
    batch = np.empty((len(images), cfg.image_size, cfg.image_size, 3), np.uint8)  # (N, S, S, 3)
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            what = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise InvalidInputError(f"image {i} is {what}; expected (H, W, 3) uint8 RGB (see load_image)")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise InvalidInputError(f"image {i} has zero size {img.shape[:2]}")
        if cfg.pad_square:
            img = pad_square(img, tuple(int(m * 255) for m in cfg.mean))
        batch[i] = _resize_crop(img, cfg.image_size, cfg.resample, exact=cfg.resize == "exact")
    return normalise(batch, cfg.mean, cfg.std, cfg.rescale)


def normalise(batch: np.ndarray, mean: Sequence[float], std: Sequence[float], rescale: float) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32: (pixel * rescale - mean) / std, as transformers."""
    # transformers: rescale in float64, cast to float32, normalise in float32. A LUT per level is exact.
    levels = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)[:, None]  # (256, 1)
    lut: np.ndarray = (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # (256, 3)
    # cv2.LUT maps all three channels in one vectorised pass (~2x np.take per channel), then one transpose.
    n, height, width = batch.shape[:3]
    cv2 = require_opencv()
    hwc = cv2.LUT(batch.reshape(n * height, width, 3), lut.reshape(1, 256, 3))  # (N*H, W, 3) float32
    return np.ascontiguousarray(hwc.reshape(n, height, width, 3).transpose(0, 3, 1, 2))  # (N, 3, H, W)


def pad_square(img: np.ndarray, fill: tuple[int, ...]) -> np.ndarray:
    """The image centred on a square of its longer side, the rest `fill` (LLaVA-1.5's expand2square;
    the left/top margin is the smaller one when the difference is odd, as transformers pads)."""
    height, width = img.shape[:2]
    if height == width:
        return img
    side = max(height, width)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = np.asarray(fill, np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = img
    return out


def _resize_crop(img: np.ndarray, size: int, resample: str, exact: bool = False) -> np.ndarray:
    """Shortest side to `size` (long side floored, as transformers does), then the centre square;
    with `exact`, both sides to `size` (BLIP's processor: the aspect ratio is not kept)."""
    height, width = img.shape[:2]
    short, long = (width, height) if width <= height else (height, width)
    new_long = size if exact else int(size * long / short)
    new_h, new_w = (new_long, size) if width <= height else (size, new_long)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    if (new_h, new_w) == (height, width):  # nothing to resample, e.g. images already S x S
        return img[top : top + size, left : left + size]
    if resample == "cv2" and new_h <= height and new_w <= width:
        cv2 = require_opencv()
        small = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
        return small[top : top + size, left : left + size]
    return resize_bicubic(img, (new_h, new_w), (top, left, size, size))


def resize_bicubic(
    img: np.ndarray, new_hw: tuple[int, int], window: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """(H, W, C) uint8 resized to `new_hw` with PIL's bicubic, bit for bit (Pillow >= 13); with
    `window` (top, left, height, width), only that part of the resized image."""
    height, width = img.shape[:2]
    new_h, new_w = new_hw
    top, left, out_h, out_w = window if window is not None else (0, 0, new_h, new_w)
    # Only the source rows and columns that reach the window are read and resampled, so a
    # 1x50000 strip never becomes a 224x11M intermediate.
    rows = _pil_coeffs(height, new_h, top, out_h) if new_h != height else None
    cols = _pil_coeffs(width, new_w, left, out_w) if new_w != width else None
    x = img[top : top + out_h] if rows is None else img[_span(rows)]
    x = x[:, left : left + out_w] if cols is None else x[:, _span(cols)]
    # Each pass rounds to uint8, so their order shows. Pillow 13 runs the vertical one first when
    # the height loses more than twice as many pixels as the width (older Pillow: always horizontal).
    vertical_first = new_h < height and height - new_h > 2 * (width - new_w)
    if rows is not None and vertical_first:
        x = _resample_axis0(x, rows[0] - rows[0][0], rows[1])
    if cols is not None:
        x = _resample_axis0(x.transpose(1, 0, 2), cols[0] - cols[0][0], cols[1]).transpose(1, 0, 2)
    if rows is not None and not vertical_first:
        x = _resample_axis0(x, rows[0] - rows[0][0], rows[1])
    return x


def _span(coeffs: tuple[np.ndarray, np.ndarray]) -> slice:
    """The source indices that taps (start, weights) read: starts never decrease along the output."""
    start, weights = coeffs
    return slice(int(start[0]), int(start[-1]) + weights.shape[1])


_PRECISION_BITS = 22  # PIL's 8-bit resampler: 32 - 8 - 2


def _pil_coeffs(in_size: int, out_size: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's fixed-point bicubic taps for output pixels [first, first + count) -> (start, weights)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # widen the kernel when shrinking: PIL's antialiasing
    support = 2.0 * filterscale  # bicubic support is 2
    ksize = math.ceil(support) * 2 + 1
    center = (np.arange(first, first + count) + 0.5) * scale  # (count,)
    start = np.maximum((center - support + 0.5).astype(np.int64), 0)
    taps = np.minimum((center + support + 0.5).astype(np.int64), in_size) - start
    offset = np.arange(ksize)[None, :]
    x = np.abs(((offset + start[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))  # (count, ksize)
    w = np.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1, (((x - 5) * x + 8) * x - 4) * -0.5)  # a = -0.5
    w = np.where((x < 2.0) & (offset < taps[:, None]), w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    w = w * (1 << _PRECISION_BITS)
    return start, np.where(w < 0, np.trunc(w - 0.5), np.trunc(w + 0.5))  # PIL rounds half away from 0


def _resample_axis0(x: np.ndarray, start: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """out[o] = clip8(sum_t weights[o, t] * x[start[o] + t]) along axis 0, in PIL's int32 fixed point."""
    # One multiply-add per tap over whole rows. No BLAS: its threads fight the runtime for cores.
    n_out, ksize = weights.shape
    flat = np.ascontiguousarray(x).reshape(x.shape[0], -1)  # (In, rest)
    w32 = weights.astype(np.int32)  # |w| < 2**23 and sum |w * 255| < 2**31: PIL's own bounds
    acc = np.full((n_out, flat.shape[1]), 1 << (_PRECISION_BITS - 1), np.int32)  # rounding offset
    term = np.empty_like(acc)
    last = x.shape[0] - 1
    for t in range(ksize):  # taps past a row's window have weight 0; clamp their index
        np.multiply(flat[np.minimum(start + t, last)], w32[:, t : t + 1], out=term)
        acc += term
    acc >>= _PRECISION_BITS
    return np.clip(acc, 0, 255).astype(np.uint8).reshape((n_out, *x.shape[1:]))
