"""ONNX -> INT8: explicit Q/DQ quantization, accuracy checks, sensitivity search, ORT CPU builds.

Works on ONNX files only (no model families). Public API:

- `quantize_int8(fp32_path, out_path, feeds, method, exclude, op_types)`: standard-op Q/DQ model.
- `output_cosine(fp32_path, q_path, feeds)`: per-output mean cosine, fp32 vs quantized, ORT CPU.
- `calibrate_to_target(...) -> CalibrationResult`: keep the most sensitive nodes in float until the
  target cosine holds.
- `optimize_for_ort(in_path, out_path)`: the `build --backend ort` graph (may hold com.microsoft ops).
"""

from mmedge.calibration.accuracy import output_cosine
from mmedge.calibration.ort_build import optimize_for_ort
from mmedge.calibration.qdq import METHODS, quantizable_nodes, quantize_int8
from mmedge.calibration.search import CalibrationResult, calibrate_to_target

__all__ = [
    "METHODS",
    "CalibrationResult",
    "calibrate_to_target",
    "optimize_for_ort",
    "output_cosine",
    "quantizable_nodes",
    "quantize_int8",
]
