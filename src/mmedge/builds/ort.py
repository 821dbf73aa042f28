"""`build --backend ort`: turn a (Q/DQ) ONNX model into an ORT-optimized graph for the CPU.

The output may hold com.microsoft ops (MatMulIntegerToFloat, QuickGelu, FusedMatMul, ...): it is for
ONNX Runtime only; the standard-op Q/DQ file stays the TensorRT input. On x86 it also holds uint8
activations, so build on the architecture family that will run it.

Passes (`ort_passes`), all exact rewrites:
- int8 -> uint8 activations (x86): ORT's integer GEMMs on x86 are U8S8, and ORT's own S8->U8 converter
  only fires when a QuantizeLinear feeds exactly one DequantizeLinear. Wherever one activation feeds
  several MatMuls (attention's q/k/v) the MatMuls then ran in float with weights dequantized on every
  call, and the Q/DQ file run as-is was slower than fp32. Converted up front, every weighted MatMul
  becomes MatMulIntegerToFloat: about 3x faster than fp32 on ViT-B/32 (measurements:
  benchmarks/RESULTS.md).
- Shape(DQ(Q(x))) -> Shape(x); quantized Gemm -> MatMul + Add (ORT has no float-output integer Gemm);
- after ORT's optimizer: weight DequantizeLinears left unfused (e.g. a Conv) are folded to float
  constants, bias Adds move into MatMulIntegerToFloat's epilogue, and unmasked self-attention over
  integer q/k/v projections becomes one QAttention (merged q/k/v GEMM, heads split in the kernel);
  unmasked self-attention over one packed q|k|v projection (BLIP's ViT) becomes MultiHeadAttention
  (`ort_mha`).

ORT's offline optimization runs at "extended" (portable; the session adds the layout-specific "all"
passes at load). `onnxruntime.transformers` fusions are off by default: on CLIP they find no
Attention pattern and their SkipLayerNormalization was slower on CPU than LayerNorm + Add.
"""

from __future__ import annotations

import logging
import platform
import tempfile
from pathlib import Path
from typing import Any

from mmedge.builds.ort_passes import (
    activations_to_uint8,
    attention_to_qattention,
    fold_constant_dequantize,
    fuse_integer_matmul_bias,
    gemms_to_matmuls,
    shapes_skip_qdq,
)
from mmedge.errors import InvalidInputError
from mmedge.export.model_files import needs_external_data, save_model
from mmedge.runtime.sections import LLMConfig

log = logging.getLogger(__name__)

LEVELS = ("basic", "extended", "all")
MATMULNBITS_ACCURACY_LEVEL = 4


def is_x86() -> bool:
    """True on x86-64, where ORT's integer GEMMs need uint8 activations."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def optimize_for_ort(
    in_path: Path,
    out_path: Path,
    *,
    level: str = "extended",
    threads: int = 2,
    uint8_activations: bool | None = None,
    transformer_fusions: str | None = None,
    num_heads: int = 0,
    hidden_size: int = 0,
    fuse_bias: bool = True,
    fuse_attention: bool = True,
    decoder: LLMConfig | None = None,
) -> dict[str, int]:
    """Write ORT's offline-optimized graph of `in_path` to `out_path` atomically; return its op counts.

    `decoder` (a manifest's `llm` section) marks an LLM step: its attention becomes
    GroupQueryAttention over an in-place cache (`ort_decoder`)."""
    import onnx
    import onnxruntime as ort

    in_path, out_path = Path(in_path), Path(out_path)
    if level not in LEVELS:
        raise InvalidInputError(f"optimization level {level!r} is not supported; choose from {list(LEVELS)}")
    model = onnx.load(str(in_path))
    if uint8_activations is None:
        uint8_activations = is_x86()
    shapes_skip_qdq(model)
    gemms = gemms_to_matmuls(model)
    if gemms:
        log.info("rewrote %d quantized Gemm nodes as MatMul + Add for integer fusion", gemms)
    if uint8_activations:
        n = activations_to_uint8(model)
        log.info("converted %d int8 activation Q/DQ pairs to uint8 for x86 integer GEMMs", n)
    if transformer_fusions:
        model = _transformer_fusions(model, transformer_fusions, num_heads, hidden_size)
    large = needs_external_data(model)
    with tempfile.TemporaryDirectory(prefix="mmedge-ort-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        save_model(model, src)
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        so.optimized_model_filepath = str(dst)
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        # Weight-only blocks fused into MatMulNBits compute with int8 activations (accuracy level 4):
        # VNNI / AMX integer kernels instead of dequantizing each block to fp32 on every call.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(MATMULNBITS_ACCURACY_LEVEL))
        if large:  # past protobuf's 2 GB ORT must write the optimized weights to a file beside the graph
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", dst.name + ".data"
            )
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
        # MatMulAddFusion would fold the Gemm rewrite back into a float Gemm before the QDQ fusions run.
        ort.InferenceSession(
            str(src),
            so,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["MatMulAddFusion"] if gemms else None,
        )
        optimized = onnx.load(str(dst))
    log.info("folded %d unfused weight dequantizations", fold_constant_dequantize(optimized))
    if fuse_bias:
        log.info("folded %d bias Adds into MatMulIntegerToFloat", fuse_integer_matmul_bias(optimized))
        if fuse_attention:  # matches only bias-fused projections
            log.info("replaced %d attention blocks by QAttention", attention_to_qattention(optimized))
    if fuse_attention:
        from mmedge.builds.ort_mha import packed_attention_to_mha

        n = packed_attention_to_mha(optimized)
        log.info("replaced %d packed-projection attention blocks by MultiHeadAttention", n)
    if decoder is not None:
        from mmedge.builds.ort_decoder import decoder_attention_to_gqa

        log.info(
            "replaced the attention of %d decoder layers by GroupQueryAttention",
            decoder_attention_to_gqa(optimized, decoder),
        )
    ops: dict[str, int] = {}
    for node in optimized.graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    save_model(optimized, out_path)  # with a `<name>.data` file beside it past 2 GB
    return ops


def _transformer_fusions(model: Any, model_type: str, num_heads: int, hidden_size: int) -> Any:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(
        model,
        model_type=model_type,
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=0,
        only_onnxruntime=False,
    )
    log.info("transformer fusions (%s): %s", model_type, opt.get_fused_operator_statistics())
    return opt.model
