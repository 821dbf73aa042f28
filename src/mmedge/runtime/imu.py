"""IMU traces for ImageBind's IMU encoder (torch-free, numpy only).

Input: a (6, T) array, accelerometer x, y, z then gyroscope x, y, z, one column a sample (ImageBind
trains on Ego4D's 200 Hz IMU, 2000 samples = 10 s). `preprocess_imu` crops or zero-pads it to
`samples` and returns float32 (6, samples); values keep their units (ImageBind's released code
applies no scaling). The exported IMU stem cuts that into 8-sample windows with reshape/transpose;
`imu_windows` is the same cut in numpy, in the exact element order of ImageBind's stem
(`unfold` on the time axis, then each window's 6 x 8 block flattened channel-major), so the
exporter can test its graph against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmedge.errors import ConfigError, InvalidInputError
from mmedge.runtime.arrays import check_finite, real_array

__all__ = ["IMU_CHANNELS", "ImuConfig", "ImuLimits", "imu_windows", "preprocess_imu"]

IMU_CHANNELS = 6  # accelerometer xyz + gyroscope xyz


@dataclass(frozen=True)
class ImuConfig:
    """`samples`: the fixed length (ImageBind: 2000); `window`: samples per token (ImageBind: 8,
    so 250 tokens of 6 x 8 = 48 values); `crop`: which part of a longer trace is kept."""

    samples: int = 2000
    window: int = 8
    crop: str = "center"  # or "start"

    def __post_init__(self) -> None:
        for name in ("samples", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
                raise ConfigError(f"ImuConfig.{name} must be an int in [1, {1 << 20}], got {value!r}")
        if self.samples % self.window:
            raise ConfigError(f"ImuConfig.samples={self.samples} is not a multiple of window={self.window}")
        if self.crop not in ("center", "start"):
            raise ConfigError(f"ImuConfig.crop={self.crop!r} is not supported; accepted: 'center', 'start'")


@dataclass(frozen=True)
class ImuLimits:
    """`max_samples`: the longest trace accepted (checked from the shape, before any work);
    10^6 samples is 83 minutes at 200 Hz."""

    max_samples: int = 1_000_000


def preprocess_imu(
    x: np.ndarray, cfg: ImuConfig = ImuConfig(), limits: ImuLimits = ImuLimits()
) -> np.ndarray:
    """(6, T) accelerometer + gyroscope trace -> new float32 (6, cfg.samples): a longer trace is
    cropped (its centre, or its start), a shorter one zero-padded at the end."""
    x = real_array(x, "IMU trace")
    if x.ndim != 2 or x.shape[0] != IMU_CHANNELS:
        raise InvalidInputError(
            f"IMU trace has shape {x.shape}; expected (6, T): accelerometer xyz and gyroscope xyz "
            "rows, one column a sample"
        )
    length = x.shape[1]
    if length == 0:
        raise InvalidInputError("IMU trace has no samples (shape (6, 0))")
    if length > limits.max_samples:
        raise InvalidInputError(
            f"IMU trace has {length} samples; the limit is ImuLimits.max_samples={limits.max_samples}"
        )
    start = (length - cfg.samples) // 2 if cfg.crop == "center" and length > cfg.samples else 0
    kept = x[:, start : start + cfg.samples]
    check_finite(kept, "IMU trace")  # only what is used: a NaN outside the crop changes nothing
    out = np.zeros((IMU_CHANNELS, cfg.samples), np.float32)
    out[:, : kept.shape[1]] = kept
    return out


def imu_windows(x: np.ndarray, window: int = 8) -> np.ndarray:
    """(..., C, T) -> (..., T // window, C * window): ImageBind's IMU patchify, element for element.

    ImageBind: `x.unfold(-1, window, window)` -> (B, C, T/w, w), `.permute(0, 2, 1, 3)` ->
    (B, T/w, C, w), reshape -> (B, T/w, C*w). So out[..., t, c * window + k] = x[..., c, t * window + k]:
    each token holds channel 0's `window` samples, then channel 1's, and so on. With C=6, T=2000,
    window=8: (250, 48), the input of the stem's Linear(48, D).
    """
    x = np.asarray(x)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InvalidInputError(f"imu_windows: window must be a positive int, got {window!r}")
    if x.ndim < 2 or x.shape[-1] % window:
        raise InvalidInputError(f"imu_windows needs (..., C, T) with T a multiple of {window}, got {x.shape}")
    *lead, channels, length = x.shape
    blocks = x.reshape(*lead, channels, length // window, window)  # (..., C, T/w, w)
    return np.ascontiguousarray(np.swapaxes(blocks, -3, -2)).reshape(
        *lead, length // window, channels * window
    )
