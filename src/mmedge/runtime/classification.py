"""Classification pipeline (Meta-Transformer): per modality path, raw items -> class logits ->
labelled probabilities.

Each path of a classification package runs a modality's tokenizer, the shared encoder and that
modality's head, and yields `logits` (batch, classes); the manifest's `classification` section names
the classes of each path and its `modalities` section says how items are prepared (point clouds
grouped, audio cut into clips, IMU traces cropped: `runtime.modality_inputs`). An item that
prepares into several rows (an audio recording's clips) gets the mean of its rows' logits.
"""

from __future__ import annotations

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.modality_inputs import mean_rows, prepare_items
from mmedge.runtime.retrieval import Label, _as_list
from mmedge.runtime.sections import SHARED_ENCODER_PATHS

DEFAULT_TOP_K = 5
# Modalities whose single item is 2-D, so that a 3-D array is a batch of them: a point cloud
# (N, 3 + F) and an IMU trace (6, T). (An audio array is (frames,) or (frames, channels).)
_BATCHED_ARRAYS = ("points", "imu")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (the largest logit subtracted first: no overflow)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    out: np.ndarray = z / z.sum(axis=-1, keepdims=True)
    return out


def check_top_k(top_k: object) -> int:
    """A positive int (a larger one than a path has classes returns every class)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInputError(f"top_k must be a positive int, got {top_k!r}")
    return int(top_k)


class ClassificationPipeline:
    """Classify items of each modality the package has into the package's labels."""

    def __init__(self, runner: ComponentRunner):
        m = runner.manifest
        if m.task != "classification" or m.classification is None or m.modalities is None:
            raise InvalidInputError(f"package {m.name!r} is not a classification package (task {m.task})")
        self.runner = runner
        self.inputs = m.modalities
        # per path, the class each logit column names
        self.labels: dict[str, tuple[str, ...]] = dict(m.classification.labels)

    def __repr__(self) -> str:
        m = self.runner.manifest
        classes = ", ".join(f"{p}: {len(self.labels[p])}" for p in self.modalities)
        return (
            f"ClassificationPipeline({m.name!r}, family={m.family!r}, classes={{{classes}}}, "
            f"backend={self.runner.backend.name!r})"
        )

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this package classifies, each its own path (points, audio, imu)."""
        paths = self.runner.manifest.pipeline.paths
        return tuple(m for m in SHARED_ENCODER_PATHS if m in paths)

    def _check_modality(self, modality: object) -> str:
        if not isinstance(modality, str) or modality not in self.modalities:
            raise InvalidInputError(
                f"package {self.runner.manifest.name!r} does not classify {modality!r}; it classifies "
                f"{', '.join(self.modalities)}"
            )
        return modality

    def logits(self, data: object, modality: str, *, sample_rate: int | None = None) -> np.ndarray:
        """(N, classes) float32 logits of N items of one modality, in the order of
        `labels[modality]`.

        points: (N, 3 + F) clouds (an (B, N, 3 + F) array is B clouds); audio: files, bytes, or
        arrays with their `sample_rate` (a recording's clips are classified and their logits
        averaged); imu: (6, T) traces (a (B, 6, T) array is B traces). docs/modalities.md."""
        modality = self._check_modality(modality)
        if modality in _BATCHED_ARRAYS and isinstance(data, np.ndarray) and data.ndim == 3:
            data = list(data)
        items = _as_list(data, f"{modality} items")
        sources, counts = prepare_items(self.inputs, modality, items, sample_rate)
        out = self.runner.run_path(modality, sources).astype(np.float32)
        return mean_rows(out, counts).astype(np.float32)

    def classify(
        self,
        data: object,
        modality: str,
        *,
        top_k: int = DEFAULT_TOP_K,
        sample_rate: int | None = None,
    ) -> list[list[Label]]:
        """For each of N items, its `top_k` most probable labels, best first; each score is the
        softmax probability over all the path's classes (ties keep the labels' order)."""
        k = check_top_k(top_k)
        probs = softmax(self.logits(data, modality, sample_rate=sample_rate))  # (N, classes)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
        top = np.take_along_axis(probs, order, axis=1).tolist()
        names = np.asarray(self.labels[modality], dtype=object)[order].tolist()
        return [
            [Label(str(n), float(p)) for n, p in zip(row_names, row_probs)]
            for row_names, row_probs in zip(names, top)
        ]


__all__ = ["DEFAULT_TOP_K", "ClassificationPipeline", "check_top_k", "softmax"]
