"""LLaVA-NeXT's any-resolution ("anyres") images on the host (torch-free: numpy + the PIL-exact resize).

An image becomes a base view (the whole image squashed to S x S) and the S x S tiles of the image
resized, keeping its aspect ratio, into the grid resolution ("pinpoint") that fits it best and
zero-padded around the centre. The vision tower encodes every view; `pack_features` puts the
projected features back together: the base view's tokens, then the tiles' tokens as one grid with
the padding rows or columns cut off and a newline embedding after every row.

Everything reproduces transformers 5.25 (`LlavaNextImageProcessorPil`, `LlavaNextProcessor`'s token
count, `LlavaNextModel.pack_image_features`) with `size={"shortest_edge": S}` and
`crop_size={"height": S, "width": S}`, the settings of every LLaVA-NeXT checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mmedge.errors import ConfigError, IntegrityError, InvalidInputError
from mmedge.runtime import schema
from mmedge.runtime.images import normalise, resize_bicubic
from mmedge.runtime.sections import CLIP_MEAN, CLIP_STD, MAX_IMAGE_SIZE, PreprocessConfig

__all__ = [
    "MAX_GRID_PIXELS",
    "MAX_GRID_SIDE",
    "MAX_PINPOINTS",
    "AnyResConfig",
    "num_image_tokens",
    "pack_features",
    "preprocess_anyres",
    "select_best_resolution",
]

# Bounds of what a manifest may ask for: every pinpoint becomes a uint8 canvas and (1 + tiles)
# float32 views, so a hostile section must not reach gigabytes. LLaVA-NeXT uses 5 pinpoints of
# at most 3 x 3 tiles of 336 pixels (1008 x 1008).
MAX_PINPOINTS = 64
MAX_GRID_SIDE = 16  # tiles along either side of a pinpoint
MAX_GRID_PIXELS = 1 << 25  # one pinpoint's area: 16 x 16 tiles of 336 fit; as float32 views, 384 MiB


@dataclass(frozen=True)
class AnyResConfig:
    """Pinpoints, tile geometry and normalisation of an anyres image input.

    `grid_pinpoints` are (height, width) resolutions, each a multiple of `tile_size` (the vision
    tower's input side S); `patch_size` is the tower's patch side, so a tile gives
    (S / patch_size)^2 feature tokens.
    """

    grid_pinpoints: tuple[tuple[int, int], ...]
    tile_size: int
    patch_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale: float = 1 / 255

    def __post_init__(self) -> None:
        if not _is_int(self.tile_size) or not 1 <= self.tile_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"tile_size must be an int in [1, {MAX_IMAGE_SIZE}], got {self.tile_size!r}")
        # Normalisation follows the same rules as a plain image input's.
        base = PreprocessConfig(self.tile_size, self.mean, self.std, rescale=self.rescale)
        object.__setattr__(self, "mean", base.mean)
        object.__setattr__(self, "std", base.std)
        if not _is_int(self.patch_size) or not 1 <= self.patch_size <= self.tile_size:
            raise ConfigError(
                f"patch_size must be an int in [1, tile_size={self.tile_size}], got {self.patch_size!r}"
            )
        if self.tile_size % self.patch_size:
            raise ConfigError(f"tile_size {self.tile_size} is not a multiple of patch_size {self.patch_size}")
        object.__setattr__(self, "grid_pinpoints", _check_pinpoints(self.grid_pinpoints, self.tile_size))

    @property
    def tokens_per_side(self) -> int:
        """Feature tokens along one side of a tile (CLS excluded)."""
        return self.tile_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        out: dict[str, Any] = schema.to_json(self)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnyResConfig:
        """Strict inverse of `to_dict`: unknown or missing keys and wrong types are ConfigErrors."""
        try:
            return schema.from_json(cls, dict(data), "anyres")
        except IntegrityError as exc:
            raise ConfigError(str(exc)) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_pinpoints(pinpoints: object, tile: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ConfigError(
            f"grid_pinpoints must be a non-empty list of (height, width) pairs, got {pinpoints!r}"
        )
    if len(pinpoints) > MAX_PINPOINTS:
        raise ConfigError(f"grid_pinpoints has {len(pinpoints)} entries; the limit is {MAX_PINPOINTS}")
    checked = []
    for point in pinpoints:
        if (
            not isinstance(point, (list, tuple))
            or len(point) != 2
            or not all(_is_int(v) and v > 0 for v in point)
        ):
            raise ConfigError(f"grid pinpoint {point!r} is not a (height, width) pair of positive ints")
        height, width = point
        if height % tile or width % tile:
            raise ConfigError(f"grid pinpoint {height}x{width} is not a multiple of tile_size {tile}")
        if max(height, width) // tile > MAX_GRID_SIDE or height * width > MAX_GRID_PIXELS:
            raise ConfigError(
                f"grid pinpoint {height}x{width} is {height // tile}x{width // tile} tiles of {tile}; the limits "
                f"are {MAX_GRID_SIDE} tiles a side and {MAX_GRID_PIXELS} pixels"
            )
        checked.append((height, width))
    return tuple(checked)


def _check_hw(image_hw: Sequence[int]) -> tuple[int, int]:
    sized = isinstance(image_hw, (tuple, list, np.ndarray)) and len(image_hw) == 2
    if not sized or not all(_is_int(v) or isinstance(v, np.integer) for v in image_hw):
        raise InvalidInputError(f"image size must be (height, width) ints, got {image_hw!r}")
    height, width = int(image_hw[0]), int(image_hw[1])
    if height < 1 or width < 1:
        raise InvalidInputError(f"image size {height}x{width} is empty; both sides must be at least 1 pixel")
    return height, width


def select_best_resolution(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps most of the image's pixels, then wastes least (as transformers)."""
    height, width = _check_hw(image_hw)
    best: tuple[int, int] | None = None
    max_effective, min_wasted = 0, math.inf
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_w * target_h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best = effective, wasted, (int(target_h), int(target_w))
    if best is None:  # the first pinpoint always wins against nothing, even when it keeps 0 pixels
        raise ConfigError("grid_pinpoints is empty")
    return best


def _fit_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
    """The image's size scaled into the target, aspect ratio kept (transformers' get_patch_output_size)."""
    (height, width), (target_h, target_w) = image_hw, target_hw
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def preprocess_anyres(image: np.ndarray, cfg: AnyResConfig) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (1 + tiles, 3, S, S) float32: the base view, then the tiles row by row."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InvalidInputError(f"image is {what}; expected (H, W, 3) uint8 RGB (see load_image)")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidInputError(f"image has zero size {image.shape[:2]}")
    tile = cfg.tile_size
    best_h, best_w = select_best_resolution(image.shape[:2], cfg.grid_pinpoints)
    new_h, new_w = _fit_size(image.shape[:2], (best_h, best_w))
    rows, cols = best_h // tile, best_w // tile
    views = np.zeros((1 + rows * cols, tile, tile, 3), np.uint8)  # zero = transformers' padding value
    views[0] = resize_bicubic(image, (tile, tile))  # the base view ignores the aspect ratio
    # The tiles are views of one canvas: the resized image pasted at the centre (odd margins put the
    # extra pixel after it), seen as (rows, S, cols, S, 3) and reordered to row-major tiles.
    canvas = np.zeros((best_h, best_w, 3), np.uint8)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resize_bicubic(image, (new_h, new_w))
    views[1:] = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile, tile, 3)
    return normalise(views, cfg.mean, cfg.std, cfg.rescale)


def _unpadded_window(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the feature grid that covers the image, not its padding
    (transformers' unpad_image and _get_unpadded_features, same float rounding)."""
    (height, width), (grid_h, grid_w) = image_hw, grid_hw
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return pad, 0, grid_h - 2 * pad, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return 0, pad, grid_h, grid_w - 2 * pad


def _token_grid(image_hw: tuple[int, int], cfg: AnyResConfig) -> tuple[int, int]:
    """Tiles along each side of the image's pinpoint."""
    best_h, best_w = select_best_resolution(image_hw, cfg.grid_pinpoints)
    return best_h // cfg.tile_size, best_w // cfg.tile_size


def num_image_tokens(
    image_hw: Sequence[int],
    cfg: AnyResConfig,
    *,
    strategy: Literal["default", "full"] = "default",
    cls_tokens: int = 1,
) -> int:
    """LLM positions of one image, as LlavaNextProcessor counts them.

    `cls_tokens` is what the tower emits besides its patch tokens (HF's num_additional_image_tokens:
    1 for CLIP, 0 for SigLIP); `strategy` is HF's vision_feature_select_strategy: "default" drops the
    first token, "full" keeps every token, so the base view counts its CLS token too.
    """
    if strategy not in ("default", "full"):
        raise ConfigError(f"strategy must be 'default' or 'full', got {strategy!r}")
    if not _is_int(cls_tokens) or cls_tokens < 0:
        raise ConfigError(f"cls_tokens must be a non-negative int, got {cls_tokens!r}")
    hw = _check_hw(image_hw)
    rows, cols = _token_grid(hw, cfg)
    side = cfg.tokens_per_side
    _, _, height, width = _unpadded_window(hw, (rows * side, cols * side))
    base = side * side + cls_tokens - (1 if strategy == "default" else 0)
    return base + height * (width + 1)  # every row of the tile grid ends with a newline


def pack_features(
    features: np.ndarray, image_hw: Sequence[int], cfg: AnyResConfig, image_newline: np.ndarray
) -> np.ndarray:
    """(1 + tiles, P, E) projected features of `preprocess_anyres`'s views -> (T, E) LLM embeddings.

    The base view's P tokens come first, as they are; then the tiles' (S / patch_size)^2 tokens each,
    arranged as one grid, cut to the image's aspect ratio, with `image_newline` (E,) after each row.
    """
    hw = _check_hw(image_hw)
    rows, cols = _token_grid(hw, cfg)
    side = cfg.tokens_per_side
    if not isinstance(features, np.ndarray) or features.ndim != 3 or features.shape[0] != 1 + rows * cols:
        got = features.shape if isinstance(features, np.ndarray) else type(features).__name__
        raise InvalidInputError(
            f"features of a {hw[0]}x{hw[1]} image must be (1 + {rows * cols}, P, E): the base view and a "
            f"{rows}x{cols} grid of tiles; got {got}"
        )
    tokens, dim = features.shape[1:]
    if tokens != side * side:  # transformers' pack_image_features fails on these too
        raise InvalidInputError(
            f"each tile must give {side}x{side} = {side * side} feature tokens, got {tokens}"
            + (
                " (a CLS token kept by the 'full' strategy cannot be packed)"
                if tokens == side * side + 1
                else ""
            )
        )
    if not isinstance(image_newline, np.ndarray) or image_newline.shape != (dim,):
        got = image_newline.shape if isinstance(image_newline, np.ndarray) else type(image_newline).__name__
        raise InvalidInputError(f"image_newline must have shape ({dim},), got {got}")
    grid = features[1:].reshape(rows, cols, side, side, dim).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * side, cols * side, dim)
    top, left, height, width = _unpadded_window(hw, grid.shape[:2])
    out = np.empty((tokens + height * (width + 1), dim), features.dtype)
    out[:tokens] = features[0]
    lines = out[tokens:].reshape(height, width + 1, dim)
    lines[:, :width] = grid[top : top + height, left : left + width]
    lines[:, width] = image_newline
    return out
