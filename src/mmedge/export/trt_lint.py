"""Lint an ONNX graph against TensorRT 10's ONNX operator matrix before an engine build.

The matrix (`export/data/tensorrt10_onnx_operators.md`, Apache-2.0, from onnx-tensorrt) says which
ops TensorRT parses, which tensor types each accepts and what restrictions apply. Finding a
refused op here costs milliseconds on any machine; finding it in `trtexec` costs a Jetson and a
build. The lint is conservative where the table is: it reports what the table forbids, nothing
it merely does not mention.

Type checks apply to each op's *data* type variable (the one shared by inputs and outputs, e.g.
`T` of Gather, not its `Tind` indices or Equal's `T1` bool result), read from the ONNX schema;
every other tensor is only checked against the types TensorRT has at all.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx.shape_inference
from google.protobuf.message import DecodeError
from onnx import TensorProto, defs, numpy_helper

from mmedge.errors import IntegrityError, InvalidInputError

_TABLE = "tensorrt10_onnx_operators.md"
_DEFAULT_DOMAINS = ("", "ai.onnx")
# ONNX element type -> the table's type names. Anything else has no TensorRT tensor type.
_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.INT4: "INT4",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.DOUBLE: "DOUBLE",
}
_TRT_TYPES = frozenset(_TYPE_NAMES.values())
_QUANTIZED = frozenset({"INT8", "INT4", "FP8"})  # only through Q/DQ (table note)
_ALIASES = {"INF64": "INT64", "FLOAT": "FP32", "FLOAT32": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16"}
# Ops whose every typed tensor is data (a conversion's source and target are both checked).
_CHECK_ALL_VARS = frozenset({"Cast", "CastLike", "ConstantOfShape", "EyeLike"})
# Input index that the table requires to be an initializer ("`axes` must be an initializer").
_CONST_INPUT = {
    "Slice": (3, "axes"),
    "Squeeze": (1, "axes"),
    "Unsqueeze": (1, "axes"),
    "Pad": (3, "axes"),
    "CumSum": (1, "axis"),
}
_CONST_INPUT.update(
    dict.fromkeys(
        (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
        ),
        (1, "axes"),
    )
)
_RESIZE_ALLOWED = {
    "mode": ("nearest", "linear"),
    "coordinate_transformation_mode": (
        "half_pixel",
        "pytorch_half_pixel",
        "tf_half_pixel_for_nn",
        "asymmetric",
        "align_corners",
    ),
    "nearest_mode": ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"),
    "keep_aspect_ratio_policy": ("stretch",),
}


@dataclass(frozen=True)
class OpSupport:
    """One row of the matrix: whether TensorRT parses the op, its types, its restrictions."""

    supported: bool
    types: frozenset[str]
    restrictions: str


@dataclass(frozen=True)
class SupportTable:
    ops: dict[str, OpSupport]
    opset_min: int
    opset_max: int


@dataclass(frozen=True)
class LintProblem:
    """One finding. `node` is the node name (or `<Op #i>` when unnamed); empty for model-level."""

    node: str
    op_type: str
    reason: str
    severity: str = "error"  # "error" blocks a build; "warning" is worth a look
    graph: str = "main"  # where the node lives, e.g. "main/loop.body" for a subgraph


@dataclass(frozen=True)
class LintReport:
    problems: tuple[LintProblem, ...]

    @property
    def ok(self) -> bool:
        """True when nothing would stop TensorRT from parsing the graph (warnings allowed)."""
        return not self.errors

    @property
    def errors(self) -> tuple[LintProblem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[LintProblem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    def to_dict(self) -> dict:
        """JSON-ready form for `reports/` and `--json`."""
        return {
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [asdict(p) for p in self.problems],
        }


def parse_support_table(text: str) -> SupportTable:
    """Parse the markdown matrix (columns Operator | Supported | Supported Types | Restrictions)."""
    ops: dict[str, OpSupport] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|", 3)]
        cells += [""] * (4 - len(cells))
        name, flag, types, restrictions = cells
        if name == "Operator":
            continue
        if flag not in ("Y", "N") or not re.fullmatch(r"[A-Za-z0-9]+", name):
            raise IntegrityError(f"{_TABLE} line {lineno}: expected '| Op | Y or N | types |', got {line!r}")
        parsed = set()
        for token in filter(None, (t.strip().upper() for t in types.split(","))):
            token = _ALIASES.get(token, token)
            if token not in _TRT_TYPES:
                raise IntegrityError(
                    f"{_TABLE} line {lineno}: unknown type {token!r}; known: {sorted(_TRT_TYPES)}"
                )
            parsed.add(token)
        ops[name] = OpSupport(flag == "Y", frozenset(parsed), restrictions.replace("<br />", " "))
    m = re.search(r"opset\s+(\d+)\s+to\s+opset\s+(\d+)", text)
    if not ops or m is None:
        raise IntegrityError(f"{_TABLE} holds no operator table or no 'opset N to opset M' range")
    return SupportTable(ops, int(m.group(1)), int(m.group(2)))


@functools.lru_cache(maxsize=1)
def support_table() -> SupportTable:
    """The packaged TensorRT 10 matrix, parsed on first use."""
    text = resources.files("mmedge.export").joinpath("data", _TABLE).read_text(encoding="utf-8")
    return parse_support_table(text)


def lint_model(model: onnx.ModelProto | str | Path) -> LintReport:
    """Report every op, type and checkable restriction in `model` that TensorRT 10 would refuse."""
    base_dir = ""
    if not isinstance(model, onnx.ModelProto):
        base_dir = str(Path(model).parent)
        try:
            model = onnx.load(str(model), load_external_data=False)  # types only; weights stay on disk
        except (OSError, ValueError, DecodeError) as exc:
            raise InvalidInputError(f"cannot read ONNX model {str(model)!r}: {exc}") from exc
    table = support_table()
    problems: list[LintProblem] = []
    opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    if opset is not None and not table.opset_min <= opset <= table.opset_max:
        severity = "error" if opset < table.opset_min else "warning"
        problems.append(
            LintProblem(
                "",
                "",
                f"model opset {opset} is outside TensorRT 10's documented "
                f"range {table.opset_min}..{table.opset_max}",
                severity,
            )
        )
    if model.functions:  # TensorRT inlines local functions; lint what it will see
        model = onnx.inliner.inline_local_functions(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception as exc:
        problems.append(
            LintProblem(
                "", "", f"shape inference failed ({exc}); only declared tensor types were checked", "warning"
            )
        )
    g = model.graph
    io = {v.name for v in (*g.input, *g.output)}
    _Linter(table, opset or table.opset_max, io, base_dir, problems).graph(g, "main", {}, {})
    return LintReport(tuple(problems))


def format_report(report: LintReport) -> str:
    """Human-readable report for the CLI: one line per problem, then a summary."""
    lines = []
    for p in report.problems:
        where = f"{p.graph}: node {p.node!r} ({p.op_type})" if p.node else "model"
        lines.append(f"{p.severity:<7}  {where}: {p.reason}")
    verdict = "ok" if report.ok else "FAILED"
    lines.append(
        f"TensorRT 10 lint {verdict}: {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
    )
    return "\n".join(lines)


def _type_map(g: onnx.GraphProto) -> dict[str, str]:
    out = {t.name: t.data_type for t in g.initializer}
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            out[v.name] = v.type.tensor_type.elem_type
    return {k: _TYPE_NAMES.get(t, TensorProto.DataType.Name(t)) for k, t in out.items()}


class _Linter:
    def __init__(self, table, opset, io, base_dir, problems):
        self.table, self.opset, self.io, self.base_dir, self.problems = table, opset, io, base_dir, problems
        self._warned: set[str] = set()
        self._seen: set[LintProblem] = set()

    def graph(self, g: onnx.GraphProto, where: str, outer_types: dict, outer_consts: dict) -> None:
        types = {**outer_types, **_type_map(g)}
        consts = {**outer_consts, **{t.name: t for t in g.initializer}}
        for n in g.node:
            if n.op_type == "Constant" and n.domain in _DEFAULT_DOMAINS:
                consts.update(dict.fromkeys(n.output, _constant_tensor(n)))
        for i, n in enumerate(g.node):
            label = n.name or f"<{n.op_type} #{i}>"
            report = functools.partial(self._add, label, n.op_type, where)
            self.node(n, types, consts, report)
            for a in n.attribute:  # subgraphs of If / Loop / Scan
                for j, sub in enumerate([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    self.graph(
                        sub, f"{where}/{label}.{a.name}" + (f"[{j}]" if a.graphs else ""), types, consts
                    )

    def _add(self, label: str, op: str, where: str, reason: str, severity: str = "error") -> None:
        problem = LintProblem(label, op, reason, severity, where)
        if problem not in self._seen:  # e.g. And(a, a) names one bad tensor twice
            self._seen.add(problem)
            self.problems.append(problem)

    def node(self, n: onnx.NodeProto, types: dict, consts: dict, report) -> None:
        if n.domain not in _DEFAULT_DOMAINS:
            report(
                f"TensorRT has no plugin for {n.domain}::{n.op_type}; only default-domain ONNX ops "
                "from the TensorRT 10 operator matrix are accepted"
            )
            return
        row = self.table.ops.get(n.op_type)
        if row is None or not row.supported:
            report(
                f"TensorRT 10 does not support {n.op_type}"
                + (" (absent from its operator matrix)" if row is None else "")
            )
            return
        if n.op_type != "Constant":  # a Constant is a weight, like an initializer: its consumers are checked
            self._types(n, row, types, report)
        self._restrictions(n, consts, report)

    def _types(self, n: onnx.NodeProto, row: OpSupport, types: dict, report) -> None:
        try:
            schema = defs.get_schema(n.op_type, self.opset, "")
        except defs.SchemaError:  # ops TensorRT keeps from old opsets (ImageScaler, ...) have no schema now
            schema = None
        data_vars = _data_vars(schema, n.op_type) if schema is not None else set()
        for is_input, names, params in (
            (True, n.input, schema.inputs if schema else []),
            (False, n.output, schema.outputs if schema else []),
        ):
            for idx, name in enumerate(names):
                t = types.get(name)
                if not name or t is None:
                    continue
                param = _formal(params, idx)
                role = f"{'input' if is_input else 'output'} {name!r}"
                if t not in _TRT_TYPES:
                    report(f"{role} is {t}; TensorRT tensors are one of {sorted(_TRT_TYPES)}")
                elif t == "DOUBLE":
                    if name not in self._warned:
                        self._warned.add(name)
                        report(
                            f"{role} is DOUBLE; TensorRT casts it down to FP32, clamping to +-FLT_MAX",
                            "warning",
                        )
                elif t in _QUANTIZED and not _quantized_role_ok(n.op_type, is_input, idx):
                    report(
                        f"{role} is {t}; TensorRT takes quantized types only as QuantizeLinear outputs "
                        "and DequantizeLinear inputs"
                    )
                else:
                    # QuantizeLinear's output and zero point take the types DequantizeLinear reads.
                    q_side = n.op_type == "QuantizeLinear" and (not is_input or idx == 2)
                    if q_side or (param is not None and param.type_str in data_vars):
                        allowed = self.table.ops["DequantizeLinear"].types if q_side else row.types
                        if allowed and t not in allowed:
                            report(
                                f"{role} is {t}; TensorRT's {n.op_type} accepts {', '.join(sorted(allowed))}"
                            )
                            continue
                    if t == "UINT8" and name not in self.io:
                        report(f"{role} is UINT8; TensorRT takes UINT8 only as a network input or output")

    def _restrictions(self, n: onnx.NodeProto, consts: dict, report) -> None:
        op, attrs = n.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        ins = list(n.input)
        if op in ("QuantizeLinear", "DequantizeLinear") and len(ins) > 2 and ins[2]:
            self._zero_point(ins[2], consts, report)
        if op in _CONST_INPUT:
            idx, what = _CONST_INPUT[op]
            if len(ins) > idx and ins[idx] and ins[idx] not in consts:
                report(f"`{what}` ({ins[idx]!r}) must be an initializer or Constant for TensorRT")
        if op in ("AveragePool", "MaxPool", "LpPool"):
            if any(d != 1 for d in attrs.get("dilations", [])):
                report(f"`dilations` {attrs['dilations']} must be empty or all ones")
            if op != "LpPool" and len(attrs.get("kernel_shape", [0, 0])) not in (2, 3):
                report(f"{len(attrs['kernel_shape'])}D pooling; TensorRT pools in 2D or 3D only")
            if op == "MaxPool" and len(n.output) > 1 and n.output[1]:
                report("the `Indices` output of MaxPool is unsupported")
        elif op == "LayerNormalization" and any(n.output[1:]):
            report("only the first output `Y` of LayerNormalization is supported")
        elif op == "Dropout" and len(ins) > 2 and ins[2]:
            value = self._const_value(ins[2], consts)
            if value is None or bool(value.any()):
                report("`training_mode` must be an initializer that is False")
        elif op == "TopK":
            if attrs.get("sorted", 1) != 1:
                report("`sorted` must be 1")
            k = self._const_value(ins[1], consts) if len(ins) > 1 else None
            if k is not None and k.size and int(k.max()) >= 3840:
                report(f"K={int(k.max())}; TensorRT's TopK needs K < 3840")
        elif op == "LSTM" and (attrs.get("input_forget", 0) or attrs.get("layout", 0)):
            report("`input_forget` and `layout` must be 0")
        elif op == "Constant" and {"sparse_value", "value_string", "value_strings"} & set(attrs):
            report("`sparse_value`, `value_string` and `value_strings` Constants are unsupported")
        elif op == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
            report(f"`reduction` {attrs['reduction']!r} is unsupported; only 'none'")
        elif op == "Resize":
            if attrs.get("antialias", 0):
                report("antialiasing Resize is unsupported")
            for key, allowed in _RESIZE_ALLOWED.items():
                value = attrs.get(key)
                if value is not None and value.decode() not in allowed:
                    report(f"Resize {key}={value.decode()!r}; TensorRT supports {', '.join(allowed)}")
        elif op == "If":
            then_out = {o.name for o in attrs["then_branch"].output}
            if then_out & {o.name for o in attrs["else_branch"].output}:
                report("the two If branches must name their outputs differently")

    def _const_value(self, name: str, consts: dict):
        tensor = consts.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor, self.base_dir)

    def _zero_point(self, name: str, consts: dict, report) -> None:
        try:
            value = self._const_value(name, consts)
        except Exception as exc:
            report(f"zero point {name!r} could not be read ({exc}); TensorRT needs it to be zero", "warning")
            return
        if name not in consts:
            report(f"zero point {name!r} is computed at run time; TensorRT needs a constant zero")
        elif value is not None and value.size and (value.astype("float64") != 0).any():
            report(
                f"zero point {name!r} has non-zero values; TensorRT quantizes symmetrically (zero point 0)"
            )


def _constant_tensor(n: onnx.NodeProto) -> TensorProto | None:
    """The value of a Constant node as a tensor (None for the sparse / string forms)."""
    for a in n.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            dtype = np.float32 if "float" in a.name else np.int64
            return numpy_helper.from_array(np.array(onnx.helper.get_attribute_value(a), dtype))
    return None


def _formal(params, idx: int):
    if idx < len(params):
        return params[idx]
    if params and params[-1].option == defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


def _data_vars(schema: defs.OpSchema, op: str) -> set[str]:
    """The type variables the table's 'Supported Types' column speaks about."""
    tvars = {c.type_param_str for c in schema.type_constraints}
    ins = [p.type_str for p in schema.inputs if p.type_str in tvars]
    outs = [p.type_str for p in schema.outputs if p.type_str in tvars]
    if op in _CHECK_ALL_VARS:
        return set(ins + outs)
    if op in ("QuantizeLinear", "DequantizeLinear"):  # the table lists what goes *into* each
        return {schema.inputs[0].type_str}
    shared = [v for v in ins if v in outs]
    if shared:  # e.g. Gather's T (data and result), not Tind
        counts = Counter(ins + outs)
        return {max(shared, key=lambda v: (counts[v], -ins.index(v)))}
    return {(ins or outs)[0]} if ins or outs else set()


def _quantized_role_ok(op: str, is_input: bool, idx: int) -> bool:
    return (op == "DequantizeLinear" and is_input) or (op == "QuantizeLinear" and (not is_input or idx == 2))
