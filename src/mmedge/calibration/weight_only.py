"""Weight-only quantization of an LLM graph: block-wise symmetric INT4 or INT8 Q/DQ on MatMul weights.

The output uses standard ops only (opset 21 DequantizeLinear with `block_size`), so the same file
is TensorRT's input; ONNX Runtime fuses each `DequantizeLinear -> MatMul` into its MatMulNBits
kernel at load. INT4 comes from onnxruntime's MatMulNBitsQuantizer (QDQ format); that quantizer
has no QDQ output for 8 bits, so INT8 is written here with the same scheme (round-to-nearest,
scale = max|w| / 127 per block of `block_size` input rows).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.staging import write_atomic

log = logging.getLogger(__name__)

WEIGHT_ONLY_OPSET = 21  # DequantizeLinear block_size and the int4 type
BITS = (4, 8)


def _to_opset21(model: Any) -> Any:
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current < WEIGHT_ONLY_OPSET:
        model = version_converter.convert_version(model, WEIGHT_ONLY_OPSET)
    model.ir_version = max(model.ir_version, 10)  # int4 needs IR 10
    return model


def _int8_blockwise(model: Any, block_size: int) -> int:
    """Insert block-wise int8 DequantizeLinear before every constant-weight MatMul; return the count."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done = 0
    for node in list(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim != 2 or w.dtype != np.float32 or w.shape[0] % block_size:
            continue
        k, n = w.shape
        blocks = w.reshape(k // block_size, block_size, n)
        scale = np.abs(blocks).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(blocks / scale[:, None]), -127, 127).astype(np.int8).reshape(k, n)
        base = node.input[1]
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{base}_q8"),
                numpy_helper.from_array(scale.astype(np.float32), f"{base}_q8_scale"),
            ]
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{base}_q8", f"{base}_q8_scale"],
            [f"{base}_dq8"],
            name=f"{node.name}_dq8",
            axis=0,
            block_size=block_size,
        )
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[1] = f"{base}_dq8"
        done += 1
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return done


def quantize_weight_only(src: Path, dst: Path, bits: int = 4, block_size: int = 32) -> int:
    """Write `src` with weight-only quantized MatMuls to `dst` atomically; return how many."""
    import onnx

    if bits not in BITS:
        raise InvalidInputError(f"weight-only quantization supports {list(BITS)} bits, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise InvalidInputError(f"block size must be a power of two >= 16, got {block_size}")
    model = _to_opset21(onnx.load(str(src)))
    if bits == 8:
        count = _int8_blockwise(model, block_size)
    else:
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        algo = DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=True, quant_format=QuantFormat.QDQ, bits=4
        )
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=block_size,
            is_symmetric=True,
            quant_format=QuantFormat.QDQ,
            algo_config=algo,
        )
        quantizer.process()
        model = quantizer.model.model
        count = sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear")
    write_atomic(Path(dst), model.SerializeToString())
    log.info("weight-only int%d: %d MatMul weights in blocks of %d", bits, count, block_size)
    return count
