"""ONNX -> INT8: explicit Q/DQ quantization, accuracy checks, sensitivity search, weight-only LLMs.

Works on ONNX files only (no model families). Public API:

- `quantize_int8(fp32_path, out_path, feeds, method, exclude, op_types)`: standard-op Q/DQ model.
- `output_cosine(fp32_path, q_path, feeds)`: per-output mean cosine, fp32 vs quantized, ORT CPU.
- `calibrate_to_target(...) -> CalibrationResult`: keep the most sensitive nodes in float until the
  target cosine holds.
"""

from mmedge.calibration.accuracy import output_cosine
from mmedge.calibration.qdq import METHODS, quantizable_nodes, quantize_int8
from mmedge.calibration.search import CalibrationResult, calibrate_to_target

__all__ = [
    "METHODS",
    "CalibrationResult",
    "calibrate_to_target",
    "output_cosine",
    "quantizable_nodes",
    "quantize_int8",
]
