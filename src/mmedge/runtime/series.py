"""Multichannel time series for a Meta-Transformer time-series tokenizer (torch-free, numpy only).

Input: (T, C), one row a time step. `preprocess_series` keeps the latest `length` steps (or the
first), standardises each channel by its own mean and standard deviation over the kept steps
(the per-window normalisation of the Time-Series-Library models Meta-Transformer's time-series
code builds on, with their 1e-5 variance floor), and zero-pads a short series on the side away
from the kept end; after standardisation 0 is the channel's mean, so padding adds no signal.
The mean and std come back too, so a forecast can be mapped back to the input's units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mmedge.errors import ConfigError, InvalidInputError
from mmedge.runtime.arrays import check_finite, real_array

__all__ = ["Series", "SeriesConfig", "SeriesLimits", "preprocess_series"]


@dataclass(frozen=True)
class SeriesConfig:
    """`length`: the fixed number of steps (96: the usual input window of those models);
    `keep`: "end" keeps the latest steps and pads in front, "start" the first and pads behind;
    `eps`: added to each channel's variance."""

    length: int = 96
    keep: str = "end"
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if (
            isinstance(self.length, bool)
            or not isinstance(self.length, int)
            or not 1 <= self.length <= 1 << 20
        ):
            raise ConfigError(f"SeriesConfig.length must be an int in [1, {1 << 20}], got {self.length!r}")
        if self.keep not in ("end", "start"):
            raise ConfigError(f"SeriesConfig.keep={self.keep!r} is not supported; accepted: 'end', 'start'")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ConfigError(f"SeriesConfig.eps must be in (0, 1), got {self.eps!r}")


@dataclass(frozen=True)
class SeriesLimits:
    """Caps checked from the shape before any work."""

    max_steps: int = 10_000_000
    max_channels: int = 4096


class Series(NamedTuple):
    """`values`: (length, C) float32 standardised; `mean`, `std`: (C,) float32 per channel."""

    values: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def preprocess_series(
    x: np.ndarray, cfg: SeriesConfig = SeriesConfig(), limits: SeriesLimits = SeriesLimits()
) -> Series:
    """(T, C) real array -> fixed-length, per-channel standardised Series."""
    x = real_array(x, "time series")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise InvalidInputError(f"time series has shape {x.shape}; expected (T,) or (T, C), one row a step")
    steps, channels = x.shape
    if steps == 0 or channels == 0:
        raise InvalidInputError(f"time series is empty (shape {x.shape})")
    if steps > limits.max_steps:
        raise InvalidInputError(
            f"time series has {steps} steps; the limit is SeriesLimits.max_steps={limits.max_steps}"
        )
    if channels > limits.max_channels:
        raise InvalidInputError(
            f"time series has {channels} channels; the limit is SeriesLimits.max_channels={limits.max_channels}"
        )
    kept = x[-cfg.length :] if cfg.keep == "end" else x[: cfg.length]
    check_finite(kept, "time series")
    kept = kept.astype(np.float64)
    mean = kept.mean(axis=0)
    std = np.sqrt(kept.var(axis=0) + cfg.eps)
    out = np.zeros((cfg.length, channels), np.float32)
    rows = slice(cfg.length - len(kept), None) if cfg.keep == "end" else slice(0, len(kept))
    out[rows] = (kept - mean) / std
    return Series(out, mean.astype(np.float32), std.astype(np.float32))
