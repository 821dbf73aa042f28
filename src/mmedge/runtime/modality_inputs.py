"""Raw data of the further modalities -> their path's input rows (the manifest's `modalities` section).

A retrieval package may embed more than images and texts (ImageBind: audio, depth, thermal, IMU),
each on its own pipeline path whose single source is `<modality>_values`. The manifest's
`modalities` section holds each one's preprocessing settings; `prepare` turns one item into the
rows its path runs on. An audio recording gives one row per clip (ImageBind averages the clips'
embeddings), every other item one row. Each preprocessor has its own limits and typed errors
(docs/audio.md, docs/modalities.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.audio import AudioConfig, audio_clips, load_audio
from mmedge.runtime.depth import DepthConfig, ThermalConfig, preprocess_depth, preprocess_thermal
from mmedge.runtime.imu import ImuConfig, preprocess_imu

# The modalities a `modalities` section can configure; each is a pipeline path of that name.
MODALITY_PATHS: tuple[str, ...] = ("audio", "depth", "thermal", "imu")


@dataclass(frozen=True)
class ModalitiesConfig:
    """Preprocessing of each further modality the package embeds (None: the package has no such path)."""

    audio: AudioConfig | None = None
    depth: DepthConfig | None = None
    thermal: ThermalConfig | None = None
    imu: ImuConfig | None = None

    def present(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITY_PATHS if getattr(self, m) is not None)


def source_name(modality: str) -> str:
    """The path's source tensor: `audio_values`, `depth_values`, ..."""
    return f"{modality}_values"


def prepare(modality: str, item: Any, config: Any, *, sample_rate: int | None = None) -> np.ndarray:
    """One item -> (rows, *input shape) float32 rows for the `modality` path.

    audio: a path, encoded bytes, or an array with `sample_rate` -> (clips, 1, mel_bins, frames);
    depth: a disparity map (array or 16-bit PNG) -> (1, 1, S, S); thermal: an 8/16-bit frame or a
    float one in [0, 1] -> (1, 1, S, S); imu: a (6, T) trace -> (1, 6, samples)."""
    if modality == "audio":
        wave = load_audio(item, sample_rate, target_rate=config.sample_rate)
        return audio_clips(wave, config)
    if sample_rate is not None:
        raise InvalidInputError(f"sample_rate is for audio; {modality} data takes none")
    if modality == "depth":
        return preprocess_depth(item, config)[None]
    if modality == "thermal":
        return preprocess_thermal(item, config)[None]
    if modality == "imu":
        return preprocess_imu(item, config)[None]
    raise InvalidInputError(
        f"unknown modality {modality!r}; accepted: image, text, {', '.join(MODALITY_PATHS)}"
    )


__all__ = ["MODALITY_PATHS", "ModalitiesConfig", "prepare", "source_name"]
