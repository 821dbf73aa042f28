"""calibrate_to_target, node sensitivity and the ORT build."""

from __future__ import annotations

import json

import onnx

from mmedge.builds.ort import optimize_for_ort
from mmedge.builds.ort_passes import activations_to_uint8
from mmedge.calibration.accuracy import output_cosine
from mmedge.calibration.qdq import quantizable_nodes, quantize_int8
from mmedge.calibration.search import CalibrationResult, calibrate_to_target
from mmedge.calibration.sensitivity import node_sensitivity


def test_target_zero_keeps_everything_quantized(tiny_onnx, calib_feeds, eval_feeds, tmp_path):
    out = tmp_path / "q.onnx"
    res = calibrate_to_target(tiny_onnx, out, calib_feeds[:8], eval_feeds, target_cosine=0.0)
    assert isinstance(res, CalibrationResult)
    assert res.met and res.float_nodes == () and res.samples == 8 and res.method == "minmax"
    assert set(res.cosine) == {"y"} and out.exists()
    json.dumps(res.to_dict())


def test_impossible_target_keeps_nodes_in_float(tiny_onnx, calib_feeds, eval_feeds, tmp_path):
    out, msgs = tmp_path / "q.onnx", []
    res = calibrate_to_target(
        tiny_onnx,
        out,
        calib_feeds[:8],
        eval_feeds,
        target_cosine=0.999999,
        max_float_nodes=3,
        progress=msgs.append,
    )
    assert not res.met and len(res.float_nodes) == 3 and msgs
    assert res.met == (min(res.cosine.values()) >= res.target)
    model = onnx.load(str(out))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name in res.float_nodes:
            assert all(producer.get(i) != "DequantizeLinear" for i in node.input)
    assert abs(output_cosine(tiny_onnx, out, eval_feeds)["y"] - res.cosine["y"]) < 1e-3


def test_target_met_after_excluding(tiny_onnx, calib_feeds, eval_feeds, tmp_path):
    full = tmp_path / "full.onnx"
    quantize_int8(tiny_onnx, full, calib_feeds[:8])
    base = output_cosine(tiny_onnx, full, eval_feeds)["y"]
    target = 1.0 - (1.0 - base) / 4  # reachable (all-float gives 1.0) but not by full quantization
    res = calibrate_to_target(
        tiny_onnx, tmp_path / "q.onnx", calib_feeds[:8], eval_feeds, target_cosine=target
    )
    assert res.met and 0 < len(res.float_nodes) <= len(quantizable_nodes(tiny_onnx))
    assert res.cosine["y"] >= target


def test_sensitivity_ranks_every_node(tiny_onnx, calib_feeds, eval_feeds, tmp_path):
    q = tmp_path / "q.onnx"
    quantize_int8(tiny_onnx, q, calib_feeds[:8])
    nodes = quantizable_nodes(tiny_onnx)
    scores = node_sensitivity(onnx.load(str(tiny_onnx)), onnx.load(str(q)), nodes, eval_feeds[:2])
    assert set(scores) == set(nodes)
    assert all(0 < s < 0.1 for s in scores.values())


def test_ort_build_fuses_integer_matmuls(tiny_onnx, calib_feeds, eval_feeds, tmp_path):
    q, built = tmp_path / "q.onnx", tmp_path / "q.ort.onnx"
    quantize_int8(tiny_onnx, q, calib_feeds[:8])
    ops = optimize_for_ort(q, built)
    assert ops.get("com.microsoft:MatMulIntegerToFloat", 0) == len(quantizable_nodes(tiny_onnx))
    assert output_cosine(q, built, eval_feeds)["y"] > 0.9999
    model = onnx.load(str(q))
    assert activations_to_uint8(model) > 0
