"""quantize_int8: explicit standard-op Q/DQ with symmetric int8 and per-channel weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mmedge.calibration.accuracy import output_cosine
from mmedge.calibration.qdq import METHODS, check_qdq_model, quantizable_nodes, quantize_int8
from mmedge.errors import InvalidInputError


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.fixture(scope="module")
def int8_path(tiny_onnx, calib_feeds, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny.int8.onnx"
    quantize_int8(tiny_onnx, out, calib_feeds)
    return out


def test_qdq_structure(int8_path, tiny_onnx):
    model = onnx.load(str(int8_path))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    inits = _inits(model)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert len(node.input) == 3 and np.all(inits[node.input[2]] == 0)
            assert inits[node.input[2]].dtype == np.int8
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dqs) == len(quantizable_nodes(tiny_onnx))
    for dq in weight_dqs:
        assert any(a.name == "axis" for a in dq.attribute)  # per-channel
        assert inits[dq.input[1]].ndim == 1 and inits[dq.input[1]].size > 1
    act_qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert act_qs and all(inits[q.input[1]].size == 1 for q in act_qs)  # per-tensor activations
    check_qdq_model(model)


def test_cosine_close_to_fp32(int8_path, tiny_onnx, eval_feeds):
    cos = output_cosine(tiny_onnx, int8_path, eval_feeds)
    assert set(cos) == {"y"} and cos["y"] >= 0.98
    assert output_cosine(tiny_onnx, tiny_onnx, eval_feeds)["y"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "minmax"])
def test_every_method_runs(method, tiny_onnx, calib_feeds, eval_feeds, tmp_path):
    out = tmp_path / f"{method}.onnx"
    quantize_int8(tiny_onnx, out, calib_feeds[:8], method=method)
    check_qdq_model(onnx.load(str(out)))
    assert output_cosine(tiny_onnx, out, eval_feeds)["y"] > 0.9


def test_excluded_node_keeps_float_weight(tiny_onnx, calib_feeds, tmp_path):
    node = quantizable_nodes(tiny_onnx)[2]
    out = tmp_path / "excl.onnx"
    quantize_int8(tiny_onnx, out, calib_feeds[:8], exclude=[node])
    model = onnx.load(str(out))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    inits = _inits(model)
    target = next(n for n in model.graph.node if n.name == node)
    assert target.input[1] in inits and inits[target.input[1]].dtype == np.float32
    assert all(producer.get(i) not in ("DequantizeLinear", "QuantizeLinear") for i in target.input)
    others = [n for n in model.graph.node if n.name in set(quantizable_nodes(tiny_onnx)) - {node}]
    assert all(producer.get(n.input[1]) == "DequantizeLinear" for n in others)


def test_atomic_write_leaves_no_temp(int8_path):
    assert [p.name for p in int8_path.parent.iterdir()] == [int8_path.name]


def test_bad_arguments(tiny_onnx, calib_feeds, tmp_path):
    with pytest.raises(InvalidInputError, match="minmax"):
        quantize_int8(tiny_onnx, tmp_path / "x.onnx", calib_feeds, method="kl")
    with pytest.raises(InvalidInputError, match="not in"):
        quantize_int8(tiny_onnx, tmp_path / "x.onnx", calib_feeds, exclude=["nope"])
    with pytest.raises(InvalidInputError, match="feed"):
        quantize_int8(tiny_onnx, tmp_path / "x.onnx", [])
    assert not (tmp_path / "x.onnx").exists()
