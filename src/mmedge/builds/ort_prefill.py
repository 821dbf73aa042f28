"""ORT prefill build of a weight-only LLM step: MatMulNBits -> DynamicQuantizeMatMul with int8 weights.

ORT's MatMulNBits suits decoding and not prompts: for one row (decoding) it reads the packed 4-bit
weights faster than an int8 GEMM, but for a prompt's rows, at any accuracy level, it is several
times slower than DynamicQuantizeMatMul on int8 weights, which ORT runs on its integer GEMM
(AMX / VNNI). On BLIP-2-base's OPT-125M a prompt's prefill spent 45 of 48 ms in MatMulNBits
(measurements: docs/generation.md, benchmarks/RESULTS.md).

The prefill build is the decode build's graph with every MatMulNBits replaced by DynamicQuantizeMatMul
over the same weights, re-quantized per output column to int8. Dequantized int4 values are not all
on one int8 grid, so the prefill weights differ from the decode build's by at most half an int8 step
of their column. The runtime binds both builds to the same in-place cache buffers and runs the
prefill build for steps of more than one token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def dequantize_nbits(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, k: int, n: int, block: int
) -> np.ndarray:
    """The float weight (K, N) that a MatMulNBits node holds.

    The layout is ORT's: B is (N, blocks, block * bits / 8) uint8, 4-bit values low nibble first;
    scales are (N * blocks); the optional uint8 zero points are packed the same way (default
    2^(bits-1))."""
    blocks = (k + block - 1) // block
    b = b.reshape(n, blocks, -1)
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, blocks, -1) if bits == 4 else b
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.float32)
    elif bits == 4:
        packed = zero_points.reshape(n, -1)
        zp = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        zp = zero_points.reshape(n, blocks).astype(np.float32)
    w = (q.astype(np.float32) - zp[..., None]) * scales.reshape(n, blocks, 1).astype(np.float32)
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


def per_column_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of a (K, N) weight: (int8 weight, float32 scale (N,))."""
    scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def nbits_to_dynamic_int8(model: Any) -> int:
    """Replace every MatMulNBits (4 or 8 bits, uint8 zero points or none, no g_idx) by
    DynamicQuantizeMatMul on per-column int8 weights, in place; return the count."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = list(graph.node)
    replaced = 0
    for idx, node in enumerate(nodes):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = list(node.input) + [""] * (6 - len(node.input))
        if (
            attrs.get("bits", 4) not in (4, 8)
            or ins[4]
            or any(x and x not in inits for x in (ins[1], ins[2], ins[3], ins[5]))
        ):
            continue
        zero_points = numpy_helper.to_array(inits[ins[3]]) if ins[3] else None
        if zero_points is not None and zero_points.dtype != np.uint8:
            continue  # float zero points (another quantizer's layout): keep the node
        k, n = int(attrs["K"]), int(attrs["N"])
        w = dequantize_nbits(
            numpy_helper.to_array(inits[ins[1]]),
            numpy_helper.to_array(inits[ins[2]]),
            zero_points,
            int(attrs.get("bits", 4)),
            k,
            n,
            int(attrs["block_size"]),
        )
        q, scale = per_column_int8(w)
        base = f"{node.name or node.output[0]}_prefill"
        graph.initializer.extend(
            [numpy_helper.from_array(q, f"{base}_w"), numpy_helper.from_array(scale, f"{base}_scale")]
        )
        nodes[idx] = helper.make_node(
            "DynamicQuantizeMatMul",
            [ins[0], f"{base}_w", f"{base}_scale", "", ins[5]],
            list(node.output),
            name=base,
            domain="com.microsoft",
        )
        replaced += 1
    if replaced:
        from mmedge.export.graph_simplify import remove_dead_nodes

        del graph.node[:]
        graph.node.extend(nodes)
        remove_dead_nodes(model)  # drops the packed 4-bit weights nothing reads now
    return replaced


def write_prefill_build(decode_build: Path, out: Path) -> int:
    """Write the prefill build of an ORT decode build atomically; return the GEMMs converted."""
    import onnx

    from mmedge.runtime.staging import write_atomic

    model = onnx.load(str(decode_build))
    n = nbits_to_dynamic_int8(model)
    write_atomic(out, model.SerializeToString())
    return n


def integer_gemms_in_place(build: Path) -> int:
    """Rewrite a weight-only build that only ever runs many rows (a decoder's cross_kv) onto int8
    GEMMs, atomically in place; return the GEMMs converted. On BLIP-base's cross_kv (577 rows, the
    24 projections as one matmul) the component ran in about half the time."""
    return write_prefill_build(build, build)
