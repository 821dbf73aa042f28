"""Video clips for ImageBind's vision encoder, through the image path (torch-free).

ImageBind's vision stem is a 3-D convolution over 2 frames (kernel (2, 14, 14)); a still image
is repeated to 2 frames inside the model. A clip is `frames` frames picked uniformly from the
decoded frames (pytorchvideo's UniformTemporalSubsample: indices trunc(linspace(0, n - 1, frames))),
each preprocessed exactly like an image (`images.preprocess`), stacked as (3, frames, S, S).

Differences from ImageBind's own video loader, which decodes 5 clips of 2 s and takes 3 spatial
crops of each: here one clip and the centre crop; and the frames are resized by the image path's
bicubic (PIL-exact) rather than a bilinear short-side scale. Decoding is the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmedge.errors import ConfigError, InvalidInputError
from mmedge.runtime.images import preprocess
from mmedge.runtime.sections import PreprocessConfig

__all__ = ["MAX_FRAMES", "VideoConfig", "uniform_frame_indices", "video_clip"]

MAX_FRAMES = 100_000  # decoded frames accepted per call: an hour at 25 fps, each one only referenced


@dataclass(frozen=True)
class VideoConfig:
    """A package's video path (the manifest's `modalities.video`): frames per clip. Each frame is
    preprocessed as the package's images are (its `preprocess` section)."""

    frames: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or not 1 <= self.frames <= 64:
            raise ConfigError(f"video frames must be an int in [1, 64], got {self.frames!r}")


def uniform_frame_indices(count: int, frames: int) -> np.ndarray:
    """(frames,) int64 indices spread evenly over `count` frames, first and last included."""
    if count < 1 or frames < 1:
        raise InvalidInputError(f"cannot pick {frames} frames from {count}")
    return np.linspace(0, count - 1, frames).astype(np.int64)


def video_clip(images: Sequence[np.ndarray], cfg: PreprocessConfig, frames: int = 2) -> np.ndarray:
    """Decoded (H, W, 3) uint8 RGB frames -> (3, frames, S, S) float32, ImageBind's vision input
    for one clip (add the batch axis in front)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if len(images) > MAX_FRAMES:
        raise InvalidInputError(f"video has {len(images)} frames; the limit is MAX_FRAMES={MAX_FRAMES}")
    picked = [images[int(i)] for i in uniform_frame_indices(len(images), frames)]
    return np.ascontiguousarray(preprocess(picked, cfg).transpose(1, 0, 2, 3))
