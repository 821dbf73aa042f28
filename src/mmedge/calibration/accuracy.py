"""How close a quantized model stays to its fp32 source: per-output cosine similarity under ORT CPU."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError


def ort_session(model: Path | bytes | Any, threads: int = 2, uint8_activations: bool = False) -> Any:
    """A CPU InferenceSession with full graph optimizations (ORT's own QDQ fusions included)."""
    import onnx
    import onnxruntime as ort

    if uint8_activations:
        from mmedge.calibration.ort_passes import activations_to_uint8

        proto = (
            model
            if isinstance(model, onnx.ModelProto)
            else (onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(str(model)))
        )
        activations_to_uint8(proto)
        model = proto.SerializeToString()
    elif isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_outputs(session: Any, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Run every feed and stack each output's rows: name -> (total_rows, -1) float64."""
    if not feeds:
        raise InvalidInputError("accuracy needs at least one evaluation feed dict")
    names = [o.name for o in session.get_outputs()]
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, dict(feed))):
            value = np.asarray(value)
            rows[name].append(value.reshape(value.shape[0] if value.ndim else 1, -1).astype(np.float64))
    return {n: np.concatenate(v) for n, v in rows.items()}


def row_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean over rows of cosine(ref_row, out_row); two all-zero rows count as identical."""
    num = (ref * out).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    both_zero = (den == 0) & (np.abs(ref).sum(axis=1) == 0) & (np.abs(out).sum(axis=1) == 0)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(both_zero, 1.0, 0.0))
    return float(np.mean(cos))


def compare_outputs(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-output mean row cosine between two `run_outputs` results."""
    missing = sorted(set(ref) - set(out))
    if missing:
        raise InvalidInputError(f"quantized model lacks outputs {missing}; it must keep the fp32 outputs")
    return {name: row_cosine(ref[name], out[name]) for name in ref}


def output_cosine(
    fp32_path: Path,
    q_path: Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    threads: int = 2,
) -> dict[str, float]:
    """Mean per-sample cosine similarity of each output, fp32 vs quantized, both run with ORT CPU."""
    ref = run_outputs(ort_session(Path(fp32_path), threads), feeds)
    out = run_outputs(ort_session(Path(q_path), threads), feeds)
    return compare_outputs(ref, out)
