"""The LLM prefill build: MatMulNBits weights read back exactly, re-quantized per column to int8."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper

from mmedge.builds.ort_prefill import dequantize_nbits, nbits_to_dynamic_int8, per_column_int8


def _matmulnbits(rng: np.random.Generator, k: int, n: int, block: int, bits: int, zero_points: bool) -> tuple:
    blocks = (k + block - 1) // block
    b = rng.integers(0, 256, (n, blocks, block * bits // 8)).astype(np.uint8)
    scales = (rng.random(n * blocks) * 0.1 + 0.01).astype(np.float32)
    zp = (
        rng.integers(0, 256, n * ((blocks + 1) // 2) if bits == 4 else n * blocks).astype(np.uint8)
        if zero_points
        else None
    )
    inits = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "s")]
    inputs = ["a", "b", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "z"))
        inputs.append("z")
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return model, b, scales, zp


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": x}
    )[0]


@pytest.mark.parametrize(
    ("bits", "k", "n", "block", "zero_points"),
    [
        (4, 64, 48, 32, False),
        (4, 96, 40, 32, True),
        (4, 80, 24, 16, True),
        (8, 64, 48, 32, False),
        (8, 80, 24, 16, True),
    ],
)
def test_dequantized_weights_are_what_ort_multiplies_by(
    bits: int, k: int, n: int, block: int, zero_points: bool
) -> None:
    rng = np.random.default_rng(bits * 1000 + k)
    model, b, scales, zp = _matmulnbits(rng, k, n, block, bits, zero_points)
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = _run(model, x)
    w = dequantize_nbits(b, scales, zp, bits, k, n, block)
    assert w.shape == (k, n)
    np.testing.assert_allclose(x @ w, y, rtol=1e-5, atol=1e-4 * np.abs(y).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_prefill_graph_is_the_same_product_in_int8(bits: int) -> None:
    rng = np.random.default_rng(bits)
    model, *_ = _matmulnbits(rng, 128, 64, 32, bits, zero_points=True)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    y = _run(model, x)
    assert nbits_to_dynamic_int8(model) == 1
    assert [nd.op_type for nd in model.graph.node] == ["DynamicQuantizeMatMul"]
    assert sorted(i.name for i in model.graph.initializer) == [
        "y_prefill_scale",
        "y_prefill_w",
    ]  # packed weights gone
    err = np.abs(_run(model, x) - y).max() / np.abs(y).max()
    assert err < 2e-2  # int8 weights per column + dynamic int8 activations, against uniform random weights


def test_per_column_int8_bounds_the_rounding() -> None:
    w = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column keeps a usable scale
    q, scale = per_column_int8(w)
    assert q.dtype == np.int8 and scale.shape == (16,) and np.all(scale > 0)
    assert np.all(np.abs(q.astype(np.float32) * scale - w) <= scale / 2 + 1e-7)
