"""FP32 ONNX -> explicit INT8 Q/DQ ONNX with onnxruntime's static quantizer.

The saved model is standard ONNX (QuantizeLinear/DequantizeLinear, default domain only) so the same
file serves ONNX Runtime and TensorRT: per-channel symmetric int8 weights, per-tensor symmetric int8
activations, every zero point 0 (TensorRT rejects non-zero `x_zero_point`), float bias (TensorRT has
no int32 DequantizeLinear).

Recipe, chosen on the CLIP ViT-B/32 vision tower at batch 1 on x86: QDQ format, S8S8, only
MatMul/Gemm/Conv nodes with a constant weight, outputs left in float, then
`builds.ort.optimize_for_ort` (the Q/DQ file run as-is misses ORT's integer path and is slower than
fp32). Built, it ran about 3x faster than ORT fp32 at an output cosine near 1 after MinMax
calibration. The alternatives were slower or worse: asymmetric U8S8 QDQ, the QOperator format,
quantizing attention's activation MatMuls too, quantizing Add/Mul/Softmax too (which also cost
accuracy), and ORT's transformer fusions (measurements: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.export.model_files import copy_model, has_external_data, save_model
from mmedge.runtime.staging import write_atomic

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Conv")
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}


class _FeedReader:
    """Replays a list of feed dicts to ORT's calibrators (the CalibrationDataReader protocol)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._start, self._end = 0, len(self._feeds)
        self._it: Iterator[Mapping[str, np.ndarray]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return dict(next(self._it, None) or {}) or None

    def rewind(self) -> None:
        self._it = iter(self._feeds[self._start : self._end])

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = start_index, end_index
        self.rewind()

    def __len__(self) -> int:
        return len(self._feeds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def calibration_method(method: str):
    """Map "minmax" | "entropy" | "percentile" to onnxruntime's CalibrationMethod."""
    from onnxruntime.quantization import CalibrationMethod

    table = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in table:
        raise InvalidInputError(
            f"calibration method {method!r} is not supported; choose from {list(METHODS)}"
        )
    return table[method]


def quantizable_nodes(model_or_path: Any, op_types: Sequence[str] | None = None) -> list[str]:
    """Names of the nodes `quantize_int8` would quantize: given op types with a constant weight input."""
    import onnx

    model = (
        model_or_path
        if isinstance(model_or_path, onnx.ModelProto)
        else onnx.load(str(model_or_path), load_external_data=False)
    )
    op_types = tuple(op_types or DEFAULT_OP_TYPES)
    inits = {i.name for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        w = _WEIGHT_INPUT.get(node.op_type)
        if w is not None and (len(node.input) <= w or node.input[w] not in inits):
            continue  # activation x activation (e.g. attention scores): no weight to quantize
        names.append(node.name)
    if len(set(names)) != len(names):
        raise UnsupportedError("the graph has duplicate or empty node names; name every node uniquely")
    return names


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    method: str = "minmax",
    exclude: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
    *,
    calibration_cache: Path | None = None,
    extra_options: Mapping[str, Any] | None = None,
) -> None:
    """Calibrate on `feeds` and write an explicit INT8 Q/DQ model (standard ops, zero points 0) atomically."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    calib = calibration_method(method)
    nodes = quantizable_nodes(fp32_path, op_types)
    unknown = sorted(set(exclude) - _all_node_names(fp32_path))
    if unknown:
        raise InvalidInputError(f"exclude names nodes that are not in {fp32_path.name}: {unknown[:5]}")
    keep = [n for n in nodes if n not in set(exclude)]
    if not keep:
        # Nothing left to quantize (and ORT reads an empty nodes_to_quantize as "all"): the float graph.
        log.info("every candidate node of %s is excluded; writing it unquantized", fp32_path.name)
        copy_model(fp32_path, out_path)
        return
    if not feeds and not (calibration_cache and Path(calibration_cache).is_file()):
        raise InvalidInputError("quantize_int8 needs at least one calibration feed dict")
    types = list(op_types or DEFAULT_OP_TYPES)
    options: dict[str, Any] = {
        "ActivationSymmetric": True,  # int8 activations with zero point 0 (TensorRT requirement)
        "WeightSymmetric": True,
        "QuantizeBias": False,  # TensorRT has no int32 DequantizeLinear; ORT keeps float bias in the epilogue
        # A float MatMul output lets ORT fuse DQ->MatMul into MatMulIntegerToFloat (no requantize step).
        "OpTypesToExcludeOutputQuantization": types,
        # Not "CalibMaxIntermediateOutputs": in onnxruntime 1.32 MinMax drops each full buffer uncomputed.
    }
    if method == "percentile":
        options["CalibPercentile"] = 99.999
    options.update(extra_options or {})
    log.info("quantizing %d of %d candidate nodes of %s (%s)", len(keep), len(nodes), fp32_path.name, method)
    with tempfile.TemporaryDirectory(prefix="mmedge-qdq-") as tmp, _without_preprocess_hint():
        tmp_out = Path(tmp) / "model.int8.onnx"
        quantize_static(
            str(fp32_path),
            str(tmp_out),
            _FeedReader(feeds) if feeds else None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=types,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=keep,
            nodes_to_exclude=list(exclude),
            calibrate_method=calib,
            extra_options=options,
            calibration_cache_path=calibration_cache,
            # a graph past protobuf's 2 GB (an SD-1.5 U-Net in fp32) is calibrated with external data
            use_external_data_format=has_external_data(fp32_path),
        )
        if not has_external_data(tmp_out):
            data = tmp_out.read_bytes()
            check_qdq_model(data)
            write_atomic(out_path, data)
            return
        proto = onnx.load(str(tmp_out))
    check_qdq_model(proto)
    save_model(proto, out_path)


def check_qdq_model(model: Any) -> None:
    """Raise UnsupportedError unless the model is standard-op Q/DQ with all zero points 0."""
    import onnx
    from onnx import numpy_helper

    if isinstance(model, (bytes, bytearray)):
        model = onnx.load_model_from_string(bytes(model))
    bad_ops = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if bad_ops:
        raise UnsupportedError(
            f"Q/DQ model holds non-standard ops {bad_ops}; only default-domain ONNX ops are accepted"
        )
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is None or np.any(numpy_helper.to_array(zp) != 0):
                raise UnsupportedError(
                    f"{node.name}: zero point must be a constant 0 (TensorRT needs symmetric int8)"
                )


def _all_node_names(path: Path) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}


@contextlib.contextmanager
def _without_preprocess_hint() -> Iterator[None]:
    # quantize_static logs "consider pre-processing" to the root logger on every call; the shape
    # inference it recommends is what quantize_static already runs, so the hint is noise here.
    hint = _PreprocessHint()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


class _PreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in str(record.msg)
