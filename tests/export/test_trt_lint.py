"""TensorRT 10 lint: the packaged matrix parses, and refused ops, types and restrictions are found."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmedge.errors import IntegrityError, InvalidInputError
from mmedge.export.trt_lint import format_report, lint_model, parse_support_table, support_table

F, I8, I64, BOOL = TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT64, TensorProto.BOOL


def _model(nodes, inputs, outputs, initializers=(), opset=17, **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in kw.get("domains", ())]
    return helper.make_model(graph, opset_imports=imports)


def _vi(name, elem, shape=(2, 3)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _errors(report) -> list[tuple[str, str]]:
    return [(p.node, p.op_type) for p in report.errors]


# --- the packaged table ---------------------------------------------------------------


def test_table_parses_every_row_with_typos_and_ragged_cells():
    t = support_table()
    assert (t.opset_min, t.opset_max) == (9, 20)
    assert len(t.ops) == 196
    assert "INT64" in t.ops["ConstantOfShape"].types  # the table spells it "INF64"
    assert t.ops["Selu"].types == {"FP32", "FP16", "BF16"}  # trailing comma
    assert t.ops["NonZero"].types == {"FP32", "FP16"}  # no closing pipe
    assert t.ops["Cast"].types >= {"UINT8", "BOOL"} and t.ops["Cast"].restrictions == ""
    assert not t.ops["Bernoulli"].supported and not t.ops["Bernoulli"].types
    assert "axes" in t.ops["ReduceSum"].restrictions and "<br" not in t.ops["Resize"].restrictions


def test_parser_rejects_unknown_types_and_malformed_rows():
    head = (
        "TensorRT supports opset 9 to opset 20.\n"
        "| Operator | Supported | Supported Types | Restrictions |\n|---|---|---|---|\n"
    )
    assert parse_support_table(head + "| Foo | Y | FP32, INF64 |\n").ops["Foo"].types == {"FP32", "INT64"}
    with pytest.raises(IntegrityError, match="unknown type 'FP64'"):
        parse_support_table(head + "| Foo | Y | FP64 |\n")
    with pytest.raises(IntegrityError, match="Y or N"):
        parse_support_table(head + "| Foo | maybe | FP32 |\n")


# --- ops, domains, types --------------------------------------------------------------


def test_fp32_add_passes_and_reports_cleanly():
    m = _model(
        [helper.make_node("Add", ["a", "b"], ["y"], name="add")], [_vi("a", F), _vi("b", F)], [_vi("y", F)]
    )
    report = lint_model(m)
    assert report.ok and report.problems == ()
    assert report.to_dict() == {"ok": True, "errors": 0, "warnings": 0, "problems": []}
    assert "lint ok" in format_report(report)


@pytest.mark.parametrize("op", ["Bernoulli", "BitShift"])
def test_unsupported_op_fails_naming_the_node(op):
    ins = ["x"] if op == "Bernoulli" else ["x", "s"]
    elem = F if op == "Bernoulli" else TensorProto.UINT8
    m = _model(
        [helper.make_node(op, ins, ["y"], name="bad_node")], [_vi(n, elem) for n in ins], [_vi("y", elem)]
    )
    report = lint_model(m)
    assert not report.ok
    assert ("bad_node", op) in _errors(report)
    text = format_report(report)
    assert "bad_node" in text and f"does not support {op}" in text and "FAILED" in text
    json.dumps(report.to_dict())  # JSON-ready


def test_non_default_domain_op_is_an_error():
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], name="fmm", domain="com.microsoft")
    m = _model([node], [_vi("a", F), _vi("b", F, (3, 2))], [_vi("y", F, (2, 2))], domains=["com.microsoft"])
    (p,) = lint_model(m).errors
    assert (p.node, p.op_type) == ("fmm", "FusedMatMul")
    assert "no plugin for com.microsoft::FusedMatMul" in p.reason


def test_type_check_catches_abs_on_int8_and_and_on_float():
    abs_int8 = _model([helper.make_node("Abs", ["x"], ["y"], name="abs")], [_vi("x", I8)], [_vi("y", I8)])
    assert ("abs", "Abs") in _errors(lint_model(abs_int8))
    and_float = _model(
        [helper.make_node("And", ["a", "b"], ["y"], name="and")], [_vi("a", F), _vi("b", F)], [_vi("y", BOOL)]
    )
    errs = lint_model(and_float).errors
    assert errs and all(p.node == "and" for p in errs) and "accepts BOOL" in errs[0].reason


def test_type_check_ignores_index_and_result_types():
    # Gather's int64 indices, Equal's bool output and Where's bool condition are not "data" types.
    nodes = [
        helper.make_node("Gather", ["x", "idx"], ["g"], name="gather"),
        helper.make_node("Equal", ["g", "g"], ["eq"], name="eq"),
        helper.make_node("Where", ["eq", "g", "g"], ["y"], name="where"),
    ]
    idx = numpy_helper.from_array(np.array([0, 1], np.int64), "idx")
    m = _model(nodes, [_vi("x", F, (4, 3))], [_vi("y", F, (2, 3))], [idx])
    assert lint_model(m).problems == ()


def test_double_is_a_warning_and_unsupported_types_are_errors():
    cast = helper.make_node("Cast", ["x"], ["d"], name="to_double", to=TensorProto.DOUBLE)
    m = _model([cast], [_vi("x", F)], [_vi("d", TensorProto.DOUBLE)])
    report = lint_model(m)
    assert report.ok and [p.node for p in report.warnings] == ["to_double"]
    cast16 = helper.make_node("Cast", ["x"], ["u"], name="to_u16", to=TensorProto.UINT16)
    errs = lint_model(_model([cast16], [_vi("x", F)], [_vi("u", TensorProto.UINT16)])).errors
    assert [(p.node, "UINT16" in p.reason) for p in errs] == [("to_u16", True)]


def test_uint8_only_at_network_boundary():
    nodes = [
        helper.make_node("Cast", ["x"], ["u"], to=TensorProto.UINT8, name="c1"),
        helper.make_node("Cast", ["u"], ["y"], to=TensorProto.FLOAT, name="c2"),
    ]
    errs = lint_model(_model(nodes, [_vi("x", F)], [_vi("y", F)])).errors
    assert {p.node for p in errs} == {"c1", "c2"} and "network input or output" in errs[0].reason


# --- Q/DQ -------------------------------------------------------------------------------


def _qdq(zero_point: int, zp_type=I8) -> onnx.ModelProto:
    np_type = onnx.helper.tensor_dtype_to_np_dtype(zp_type)
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
        numpy_helper.from_array(np.array(zero_point, np_type), "zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], name="dq"),
    ]
    return _model(nodes, [_vi("x", F)], [_vi("y", F)], inits)


def test_qdq_with_zero_zero_point_passes():
    assert lint_model(_qdq(0)).problems == ()


def test_qdq_with_nonzero_zero_point_fails():
    errs = lint_model(_qdq(3)).errors
    assert {p.node for p in errs} == {"q", "dq"}
    assert all("zero point 'zp' has non-zero values" in p.reason for p in errs)


def test_uint8_quantization_is_refused():
    # onnxruntime's default asymmetric UINT8 activations: TensorRT only quantizes to signed types.
    errs = lint_model(_qdq(0, TensorProto.UINT8)).errors
    assert {p.node for p in errs} == {"q", "dq"}
    assert any(
        "output 'q' is UINT8; TensorRT's QuantizeLinear accepts FP8, INT4, INT8" in p.reason for p in errs
    )


def test_int8_outside_qdq_is_refused():
    w = numpy_helper.from_array(np.ones((3, 3), np.int8), "w")
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], name="t"),
        helper.make_node("DequantizeLinear", ["wt", "s"], ["wf"], name="dq"),
        helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm"),
    ]
    s = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    errs = lint_model(_model(nodes, [_vi("x", F, (2, 3))], [_vi("y", F)], [w, s])).errors
    assert {p.node for p in errs} == {"t"} and "quantized types only" in errs[0].reason


# --- restrictions, subgraphs, opset, files ----------------------------------------------


def test_axes_must_be_constant_and_other_restrictions():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape", start=0, end=1),
        helper.make_node("Sub", ["s", "one"], ["ax"], name="sub"),
        helper.make_node("ReduceSum", ["x", "ax"], ["r"], name="rsum"),
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=0),
        helper.make_node("Resize", ["x", "", "sc"], ["z"], name="rs", mode="cubic"),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "k"),
        numpy_helper.from_array(np.array([1, 1], np.float32), "sc"),
    ]
    report = lint_model(
        _model(nodes, [_vi("x", F)], [_vi("r", F), _vi("v", F), _vi("z", F)], inits, opset=18)
    )
    assert {p.node for p in report.errors} == {"rsum", "topk", "rs"}


def test_bad_op_inside_loop_and_if_subgraphs_is_found():
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Bernoulli", ["v_in"], ["v_out"], name="inner_bern"),
        ],
        "body",
        [_vi("it", I64, ()), _vi("cond_in", BOOL, ()), _vi("v_in", F)],
        [_vi("cond_out", BOOL, ()), _vi("v_out", F)],
    )
    then_g = helper.make_graph(
        [helper.make_node("Det", ["x"], ["t"], name="inner_det")], "then", [], [_vi("t", F, ())]
    )
    else_g = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["e"], keepdims=0)], "else", [], [_vi("e", F, ())]
    )
    inits = [
        numpy_helper.from_array(np.array(3, np.int64), "n"),
        numpy_helper.from_array(np.array(True), "c"),
    ]
    nodes = [
        helper.make_node("Loop", ["n", "c", "x0"], ["y"], name="loop", body=body),
        helper.make_node("If", ["c"], ["z"], name="iff", then_branch=then_g, else_branch=else_g),
    ]
    m = _model(nodes, [_vi("x0", F), _vi("x", F, (3, 3))], [_vi("y", F), _vi("z", F, ())], inits)
    report = lint_model(m)
    assert {(p.node, p.graph) for p in report.errors} == {
        ("inner_bern", "main/loop.body"),
        ("inner_det", "main/iff.then_branch"),
    }


def test_opset_outside_range():
    add = [helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    io = ([_vi("a", F), _vi("b", F)], [_vi("y", F)])
    new = lint_model(_model(add, *io, opset=21))
    assert new.ok and len(new.warnings) == 1 and "opset 21" in new.warnings[0].reason
    assert not lint_model(_model(add, *io, opset=8)).ok


def test_lints_a_file_and_rejects_a_missing_one(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_qdq(5), str(path))
    assert not lint_model(path).ok and not lint_model(str(path)).ok
    with pytest.raises(InvalidInputError, match="cannot read ONNX model"):
        lint_model(tmp_path / "missing.onnx")


def test_exported_torch_transformer_block_passes(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.mlp = (
                nn.Linear(16, 48),
                nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)),
            )
            self.norm = nn.LayerNorm(16)

        def forward(self, x):  # (B, N, C)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)  # (B, N, N)
            return self.norm(x + self.mlp(att @ v))

    path = tmp_path / "block.onnx"
    torch.onnx.export(
        Block().eval(),
        (torch.randn(2, 5, 16),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch", 1: "seq"}},
    )
    report = lint_model(path)
    assert report.problems == (), format_report(report)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"LayerNormalization", "Softmax", "MatMul"} <= ops


def test_local_functions_are_linted_as_inlined(tmp_path):
    body = [helper.make_node("Bernoulli", ["x"], ["y"], name="fn_bern")]
    fn = helper.make_function("local", "MyOp", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    call = helper.make_node("MyOp", ["a"], ["b"], domain="local", name="call")
    graph = helper.make_graph([call], "g", [_vi("a", F)], [_vi("b", F)])
    imports = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    report = lint_model(helper.make_model(graph, opset_imports=imports, functions=[fn]))
    assert [p.op_type for p in report.errors] == ["Bernoulli"]


def test_garbage_file_is_invalid_input(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"\x0bgarbage")
    with pytest.raises(InvalidInputError, match="cannot read ONNX model"):
        lint_model(tmp_path / "g.onnx")


def test_constant_node_axes_and_zero_points_count_as_constants():
    nodes = [
        helper.make_node("Constant", [], ["ax"], value_ints=[0], name="c_axes"),
        helper.make_node("Unsqueeze", ["x", "ax"], ["u"], name="unsq"),
        helper.make_node(
            "Constant", [], ["zp"], value=numpy_helper.from_array(np.array(2, np.int8)), name="c_zp"
        ),
        helper.make_node("Constant", [], ["s"], value_float=0.5, name="c_s"),
        helper.make_node("QuantizeLinear", ["u", "s", "zp"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq"),
    ]
    report = lint_model(_model(nodes, [_vi("x", F)], [_vi("y", F, (1, 2, 3))]))
    assert [(p.node, "non-zero" in p.reason) for p in report.problems] == [("q", True)]
