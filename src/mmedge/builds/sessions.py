"""ONNX Runtime CPU sessions as a build runs them, for the checks that compare graphs (build, calibration)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.export.model_files import needs_external_data, save_model


def ort_session(model: Path | bytes | Any, threads: int = 2, uint8_activations: bool = False) -> Any:
    """A CPU InferenceSession with full graph optimizations (ORT's own QDQ fusions included)."""
    import onnx
    import onnxruntime as ort

    if uint8_activations:
        from mmedge.builds.ort_passes import activations_to_uint8

        proto = (
            model
            if isinstance(model, onnx.ModelProto)
            else (onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(str(model)))
        )
        activations_to_uint8(proto)
        model = proto
    if isinstance(model, onnx.ModelProto):
        if needs_external_data(model):  # past 2 GB: from a file with its tensors beside it
            with tempfile.TemporaryDirectory(prefix="mmedge-session-") as tmp:
                save_model(model, Path(tmp) / "model.onnx")
                return ort_session(Path(tmp) / "model.onnx", threads)
        model = model.SerializeToString()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_outputs(session: Any, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Run every feed and stack each output's rows: name -> (total_rows, -1) float64 (rows of
    different sizes zero-padded to the widest)."""
    if not feeds:
        raise InvalidInputError("accuracy needs at least one evaluation feed dict")
    names = [o.name for o in session.get_outputs()]
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, dict(feed))):
            value = np.asarray(value)
            rows[name].append(value.reshape(value.shape[0] if value.ndim else 1, -1).astype(np.float64))
    return {n: np.concatenate(_same_width(v)) for n, v in rows.items()}


def _same_width(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Rows of feeds whose outputs differ in size (a shared encoder's sequences per modality),
    zero-padded to the widest: row cosines and largest errors are unchanged by equal zeros."""
    width = max(p.shape[1] for p in parts)
    return [np.pad(p, ((0, 0), (0, width - p.shape[1]))) if p.shape[1] < width else p for p in parts]
