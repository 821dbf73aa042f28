"""What a TensorRT build of one component does, decided without TensorRT: the engine plan.

Every precision is built as a strongly typed network: the ONNX graph's own types decide the
kernels (fp32 / TF32, an fp16 graph's FP16, the INT8 of explicit Q/DQ nodes, the INT4 of weight-only
DequantizeLinear), and no weak-typing builder flag is set. That is the only mode TensorRT 11 has
(it removed `BuilderFlag.FP16` / `INT8` with every weak-typing API) and the recommended one for Q/DQ
graphs on TensorRT 10, so one plan serves both generations; what differs between them is listed in
`API_GENERATIONS`.

The plan is computed from the manifest and the ONNX graph alone, so `mmedge build --backend
tensorrt --plan` prints it on a machine with neither TensorRT nor a GPU, and the build applies the
same plan (`trt_build.build_network`): there is one place that decides flags and profiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.runtime.manifest import ComponentEntry

DEFAULT_WORKSPACE = 2 << 30  # bytes; Jetson Orin Nano has 8 GiB shared with the CPU
HARDWARE_LEVELS = ("none", "ampere_plus")
# Build settings a caller (or a device bundle's `bundle.settings`) may give, with their defaults.
DEVICE_SETTINGS: dict[str, Any] = {
    "workspace_bytes": DEFAULT_WORKSPACE,
    # An engine that later TensorRT versions of the same major can run (it embeds its lean runtime;
    # the runtime must allow engine host code to load it).
    "version_compatible": False,
    # "ampere_plus": one engine for every GPU from Ampere on, at some speed cost.
    "hardware_compatibility": "none",
}


@dataclass(frozen=True)
class ApiGeneration:
    """The parts of one TensorRT Python API generation that a build depends on."""

    version: str
    # `NetworkDefinitionCreationFlag.STRONGLY_TYPED` exists (10.x); on 11 a network is always strongly typed.
    strongly_typed_flag: bool
    # DequantizeLinear with `block_size` (weight-only) for these weight types only.
    block_weight_types: tuple[str, ...]
    # The BuilderFlag members mmedge may set (all in both generations' bindings).
    builder_flags: frozenset[str] = frozenset({"VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "TF32"})


# From the Python bindings at tags v10.3.0 (the TensorRT of JetPack 6) and v11.1
# (python/src/infer/pyCore.cpp) and NvInfer.h's block-quantization rules (INT4 only in 10.3; FP4, FP8
# and INT4 in 11.1; never INT8). The test fakes carry the full member lists (tests/trt_members.py).
API_GENERATIONS: dict[str, ApiGeneration] = {
    "10.3": ApiGeneration(
        "10.3",
        strongly_typed_flag=True,
        block_weight_types=("int4",),
    ),
    "11.1": ApiGeneration(  # STRONGLY_TYPED is still a member, deprecated: a network always is
        "11.1",
        strongly_typed_flag=False,
        block_weight_types=("int4", "fp8", "fp4"),
    ),
}


def api_generation(version: str) -> ApiGeneration:
    """The known generation for a TensorRT version string ("10.3.0.26" -> 10.3's facts; later 10.x
    minors share 10.3's, 11.x share 11.1's)."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        raise InvalidInputError(f"TensorRT version {version!r} is not <major>.<minor>[...]") from None
    if major == 10 and minor >= 3:
        return API_GENERATIONS["10.3"]
    if major == 11:
        return API_GENERATIONS["11.1"]
    raise UnsupportedError(
        f"TensorRT {version} is not supported; mmedge builds with TensorRT 10.3 or later 10.x, or 11.x"
    )


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The build settings with defaults filled in; an unknown or malformed one is refused rather than
    ignored, since the engine would not be what was asked for."""
    if unknown := sorted(set(settings) - set(DEVICE_SETTINGS)):
        raise UnsupportedError(
            f"TensorRT build settings {unknown} are not known; this runtime knows {sorted(DEVICE_SETTINGS)}"
        )
    out = {**DEVICE_SETTINGS, **settings}
    workspace = out["workspace_bytes"]
    if isinstance(workspace, bool) or not isinstance(workspace, int) or workspace <= 0:
        raise InvalidInputError(f"workspace_bytes must be a positive int, got {workspace!r}")
    if not isinstance(out["version_compatible"], bool):
        raise InvalidInputError(
            f"version_compatible must be true or false, got {out['version_compatible']!r}"
        )
    if out["hardware_compatibility"] not in HARDWARE_LEVELS:
        raise InvalidInputError(
            f"hardware_compatibility must be one of {HARDWARE_LEVELS}, got {out['hardware_compatibility']!r}"
        )
    return out


def profile(entry: ComponentEntry) -> dict[str, list[list[int]]]:
    """(min, opt, max) shapes per input from the manifest's symbolic dims."""
    out = {}
    for spec in entry.inputs:
        out[spec.name] = [
            [getattr(entry.dims[d], which) if isinstance(d, str) else d for d in spec.shape]
            for which in ("min", "opt", "max")
        ]
    return out


# ONNX operand slots TensorRT reads as shapes (the value must be known on the host at enqueue).
_SHAPE_OPERANDS = {
    "Slice": (1, 2, 3, 4),
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "Resize": (3,),
    "TopK": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
}
# Ops through which a value that ends up a shape stays a shape tensor.
_SHAPE_PASS = {
    "Sub",
    "Add",
    "Mul",
    "Div",
    "Neg",
    "Cast",
    "Concat",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Min",
    "Max",
}


def shape_tensor_inputs(model: Any) -> list[str]:
    """The graph inputs TensorRT will treat as shape tensors: integer inputs whose value reaches a
    shape operand (`logits_to_keep` slices the logits). Their values come from host memory and the
    optimization profile needs their value range (`shape_values`)."""
    graph = model.graph
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, slot))
    found = []
    for inp in graph.input:
        if inp.type.tensor_type.elem_type not in (6, 7):  # INT32, INT64
            continue
        seen, frontier = set(), [inp.name]
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            for node, slot in consumers.get(name, ()):
                if slot in _SHAPE_OPERANDS.get(node.op_type, ()):
                    found.append(inp.name)
                    frontier = []
                    break
                if node.op_type in _SHAPE_PASS:
                    frontier.extend(node.output)
    return sorted(set(found))


@dataclass(frozen=True)
class EngineSource:
    """What a component's manifest entry contributes to its engine at one precision (JSON values,
    so that it can be part of an engine cache key)."""

    component: str
    precision: str
    profile: dict[str, list[list[int]]]
    # (min, max) of each integer input; a shape-tensor input's profile values come from it.
    value_ranges: dict[str, list[int]]
    weight_type: str | None = None  # "int4" / "int8" for a block-wise weight-only graph

    @classmethod
    def of(cls, component: str, entry: ComponentEntry, precision: str) -> EngineSource:
        prec = entry.precisions.get(precision)
        if prec is None:
            raise UnsupportedError(
                f"component {component!r} has no {precision!r} graph; it has {sorted(entry.precisions)}"
            )
        # `int_ranges` are [low, high) of calibration samples; a value may reach the widest dim
        # (`logits_to_keep` keeps at most every new position).
        widest = max((r.max for r in entry.dims.values()), default=1)
        return cls(
            component,
            precision,
            profile(entry),
            {n: [lo, max(hi - 1, widest)] for n, (lo, hi) in sorted(entry.int_ranges.items())},
            precision if prec.calibration.get("method") == "weight-only" else None,
        )


@dataclass(frozen=True)
class EnginePlan:
    """One component at one precision, as TensorRT would build it (`skip` says why it will not)."""

    component: str
    precision: str
    tensorrt: str
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    hardware_compatibility: str
    workspace_bytes: int
    profile: dict[str, list[list[int]]]
    shape_values: dict[str, list[list[int]]]
    skip: str = ""

    def record(self) -> dict[str, Any]:
        return asdict(self)


def plan_engine(
    source: EngineSource, model: Any, settings: Mapping[str, Any], api: ApiGeneration
) -> EnginePlan:
    """The plan for one component precision whose ONNX graph is `model` (an onnx.ModelProto)."""
    checked = check_settings(settings)
    skip = ""
    if source.weight_type is not None and source.weight_type not in api.block_weight_types:
        skip = (
            f"TensorRT {api.version} dequantizes block-wise weights only as {list(api.block_weight_types)}; "
            f"this {source.weight_type} weight-only graph runs on ONNX Runtime "
            "(`mmedge calibrate --weight-bits 4` makes one TensorRT builds)"
        )
    flags = ["VERSION_COMPATIBLE"] if checked["version_compatible"] else []
    if missing := [f for f in flags if f not in api.builder_flags]:
        raise UnsupportedError(f"TensorRT {api.version} has no builder flags {missing}")
    values = {}
    for name in shape_tensor_inputs(model):
        if name not in source.value_ranges:
            raise UnsupportedError(
                f"input {name!r} of {source.component} is a shape tensor for TensorRT, and the manifest "
                "gives no value range for it (int_ranges); re-export the package"
            )
        lo, hi = source.value_ranges[name]
        size = 1
        for d in source.profile[name][2]:
            size *= d
        values[name] = [[lo] * size, [lo] * size, [hi] * size]
    return EnginePlan(
        component=source.component,
        precision=source.precision,
        tensorrt=api.version,
        network_flags=("STRONGLY_TYPED",) if api.strongly_typed_flag else (),
        builder_flags=tuple(flags),
        hardware_compatibility=checked["hardware_compatibility"],
        workspace_bytes=checked["workspace_bytes"],
        profile=source.profile,
        shape_values=values,
        skip=skip,
    )
