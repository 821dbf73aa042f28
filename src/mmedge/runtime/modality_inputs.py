"""Raw data of the further modalities -> their path's input rows (the manifest's `modalities` section).

A package may read more than images and texts (ImageBind embeds audio, depth, thermal and IMU;
Meta-Transformer classifies point clouds, audio and IMU), each on its own pipeline path whose
source is `<modality>_values` (point clouds: `point_groups` and `point_centers`). The manifest's
`modalities` section holds each one's preprocessing settings; `prepare` turns one item into the
rows its path runs on. An audio recording gives one row per clip (ImageBind averages the clips'
embeddings), every other item one row. Each preprocessor has its own limits and typed errors
(docs/audio.md, docs/modalities.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.audio import AudioConfig, audio_clips, load_audio
from mmedge.runtime.depth import DepthConfig, ThermalConfig, preprocess_depth, preprocess_thermal
from mmedge.runtime.imu import ImuConfig, preprocess_imu
from mmedge.runtime.points import PointConfig, group_points
from mmedge.runtime.sections import PreprocessConfig
from mmedge.runtime.video import VideoConfig, video_clip

# The modalities a `modalities` section can configure; each is a pipeline path of that name.
MODALITY_PATHS: tuple[str, ...] = ("audio", "depth", "thermal", "imu", "points", "video")


@dataclass(frozen=True)
class ModalitiesConfig:
    """Preprocessing of each further modality the package embeds (None: the package has no such path)."""

    audio: AudioConfig | None = None
    depth: DepthConfig | None = None
    thermal: ThermalConfig | None = None
    imu: ImuConfig | None = None
    points: PointConfig | None = None
    video: VideoConfig | None = None

    def present(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITY_PATHS if getattr(self, m) is not None)


def prepare(
    modality: str,
    item: Any,
    config: Any,
    *,
    sample_rate: int | None = None,
    image: PreprocessConfig | None = None,
) -> dict[str, np.ndarray]:
    """One item -> its path's sources, float32 rows: (rows, *input shape) each.

    audio: a path, encoded bytes, or an array with `sample_rate` -> audio_values (clips, 1,
    mel_bins, frames); depth: a disparity map (array or 16-bit PNG) -> depth_values (1, 1, S, S);
    thermal: an 8/16-bit frame or a float one in [0, 1] -> thermal_values (1, 1, S, S); imu: a
    (6, T) trace -> imu_values (1, 6, samples); points: an (N, 3 + F) cloud -> point_groups
    (1, G, K, 3 + F) and point_centers (1, G, 3); video: decoded (H, W, 3) uint8 frames (a list or a
    (T, H, W, 3) array), `config.frames` of them picked evenly and each preprocessed by `image` ->
    video_values (1, 3, frames, S, S)."""
    if modality == "audio":
        wave = load_audio(item, sample_rate, target_rate=config.sample_rate)
        return {"audio_values": audio_clips(wave, config)}
    if sample_rate is not None:
        raise InvalidInputError(f"sample_rate is for audio; {modality} data takes none")
    if modality == "depth":
        return {"depth_values": preprocess_depth(item, config)[None]}
    if modality == "thermal":
        return {"thermal_values": preprocess_thermal(item, config)[None]}
    if modality == "imu":
        return {"imu_values": preprocess_imu(item, config)[None]}
    if modality == "points":
        groups = group_points(item, config)
        return {"point_groups": groups.neighbourhoods[None], "point_centers": groups.centres[None]}
    if modality == "video":
        if image is None:
            raise InvalidInputError(
                "a video clip is preprocessed as the package's images; it has no preprocess section"
            )
        return {"video_values": video_clip(item, image, config.frames)[None]}
    raise InvalidInputError(
        f"unknown modality {modality!r}; accepted: image, text, {', '.join(MODALITY_PATHS)}"
    )


def prepare_items(
    config: ModalitiesConfig,
    modality: str,
    items: list,
    sample_rate: int | None = None,
    image: PreprocessConfig | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Items of one modality -> (their path's sources, every item's rows stacked; rows per item).
    An error names the item (its path, or its index)."""
    parts = []
    for i, item in enumerate(items):
        try:
            parts.append(
                prepare(modality, item, getattr(config, modality), sample_rate=sample_rate, image=image)
            )
        except InvalidInputError as exc:
            which = repr(str(item)) if isinstance(item, (str, os.PathLike)) else f"#{i}"
            raise InvalidInputError(f"{modality} {which}: {exc}") from exc
    counts = np.array([len(next(iter(p.values()))) for p in parts])
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, counts


def mean_rows(out: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(sum(counts), ...) per-row outputs -> (len(counts), ...) each item's mean over its rows."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.add.reduceat(out, starts, axis=0) / counts.reshape(-1, *[1] * (out.ndim - 1))


__all__ = ["MODALITY_PATHS", "ModalitiesConfig", "mean_rows", "prepare", "prepare_items"]
