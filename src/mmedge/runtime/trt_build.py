"""Building a TensorRT engine from an ONNX graph: the network, its optimization profile, its flags.

Shared by `mmedge build --backend tensorrt` on a host (`builds/tensorrt.py`, from a package's files)
and by a "tensorrt" device bundle, which builds its engines on the device on first use from bytes
the runtime hashed as it read them (`runtime/engine_cache.py`). `tensorrt` is imported by the
functions that need it (the `[trt]` extra).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.runtime.backends.tensorrt import _logger, _trt
from mmedge.runtime.manifest import ComponentEntry

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# INT8 comes from the explicit Q/DQ nodes of the int8 ONNX; the flag lets TensorRT run them in INT8.
# Layers outside Q/DQ pairs stay FP32 (no implicit calibration: TensorRT 10 deprecates it).
_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}
DEFAULT_WORKSPACE = 2 << 30  # bytes; Jetson Orin Nano has 8 GiB shared with the CPU


def profile(entry: ComponentEntry) -> dict[str, list[list[int]]]:
    """(min, opt, max) shapes per input from the manifest's symbolic dims."""
    out = {}
    for spec in entry.inputs:
        out[spec.name] = [
            [getattr(entry.dims[d], which) if isinstance(d, str) else d for d in spec.shape]
            for which in ("min", "opt", "max")
        ]
    return out


def check_dims(dims: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[list[int]]]:
    out = {}
    for name, shapes in dims.items():
        try:
            lo, opt, hi = ([int(d) for d in s] for s in shapes)
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"dims[{name!r}] must be (min_shape, opt_shape, max_shape), got {shapes!r}"
            ) from None
        if not len(lo) == len(opt) == len(hi) or not all(0 < a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise InvalidInputError(
                f"dims[{name!r}] = {shapes!r}: need equal ranks and 0 < min <= opt <= max per dim"
            )
        out[name] = [lo, opt, hi]
    return out


def trt_precision(precision: str) -> str:
    """The TensorRT build mode of a package precision: int8 runs its Q/DQ nodes in INT8, fp16 allows
    FP16 kernels, and fp32 / int4 (weight-only DequantizeLinear nodes) build with no flag."""
    return precision if precision in ("int8", "fp16") else "fp32"


# Build settings a device bundle may carry (`bundle.settings`), with their defaults.
DEVICE_SETTINGS: dict[str, Any] = {"workspace_bytes": DEFAULT_WORKSPACE}


def build_engine_bytes(
    model: bytes,
    *,
    precision: str,
    settings: Mapping[str, Any],
    profile: Mapping[str, Sequence[Sequence[int]]],
    name: str = "model",
) -> bytes:
    """Build a serialized engine from a self-contained ONNX model in memory (no file is read).

    The device side of a "tensorrt" bundle: `model` holds bytes the runtime hashed as it read them.
    `settings` are the bundle's build settings (`DEVICE_SETTINGS`); an unknown one is refused rather
    than ignored, since the engine would not be what the bundle asked for."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision {precision!r} is not one of {PRECISIONS}")
    if unknown := sorted(set(settings) - set(DEVICE_SETTINGS)):
        raise UnsupportedError(
            f"TensorRT build settings {unknown} are not known; this runtime knows {sorted(DEVICE_SETTINGS)}"
        )
    workspace = {**DEVICE_SETTINGS, **settings}["workspace_bytes"]
    if isinstance(workspace, bool) or not isinstance(workspace, int) or workspace <= 0:
        raise InvalidInputError(f"workspace_bytes must be a positive int, got {workspace!r}")
    data, _ = build_network(
        lambda parser: parser.parse(model), name, check_dims(profile), precision, workspace
    )
    return data


def device_builder(
    model: bytes,
    *,
    precision: str,
    settings: Mapping[str, Any],
    profile: Mapping[str, Sequence[Sequence[int]]],
) -> bytes:
    """The engine cache's builder (`runtime.engine_cache.EngineBuilder`): a package precision
    ("int4", "int8", ...) built in its TensorRT mode (`trt_precision`)."""
    return build_engine_bytes(model, precision=trt_precision(precision), settings=settings, profile=profile)


def build_network(
    parse: Callable[[Any], bool],
    name: str,
    profile_dims: dict[str, list[list[int]]],
    precision: str,
    workspace_bytes: int,
    timing_cache: bytes | None = None,
    cache_file: Path | None = None,
) -> tuple[bytes, bytes | None]:
    """Parse (by `parse(parser)`), configure and build; return the plan and the updated timing cache."""
    trt = _trt()
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parse(parser):
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise UnsupportedError(
            f"TensorRT cannot parse {name}; run the export lint "
            f"(mmedge.export.trt_lint) for details. Parser errors:\n{errors}"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for flag in _FLAGS[precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    inputs = {t.name: tuple(t.shape) for t in (network.get_input(i) for i in range(network.num_inputs))}
    if unknown := sorted(set(profile_dims) - set(inputs)):
        raise InvalidInputError(
            f"dims name {unknown}, which are not inputs of {name}; inputs: {sorted(inputs)}"
        )
    if profile_dims:
        profile = builder.create_optimization_profile()
        for input_name, shape in inputs.items():
            if input_name not in profile_dims:
                if any(d < 0 for d in shape):
                    raise InvalidInputError(
                        f"input {input_name!r} has dynamic shape {shape}; give its (min, opt, max) in dims"
                    )
                profile.set_shape(input_name, shape, shape, shape)
                continue
            lo, opt, hi = profile_dims[input_name]
            if len(lo) != len(shape) or any(
                d >= 0 and not lo[i] == opt[i] == hi[i] == d for i, d in enumerate(shape)
            ):
                raise InvalidInputError(
                    f"dims[{input_name!r}] = {profile_dims[input_name]} does not fit the input's shape {shape}"
                )
            profile.set_shape(input_name, lo, opt, hi)
        config.add_optimization_profile(profile)
    elif dynamic := sorted(n for n, s in inputs.items() if any(d < 0 for d in s)):
        raise InvalidInputError(f"inputs {dynamic} have dynamic shapes; give their (min, opt, max) in dims")
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache)
        if not config.set_timing_cache(cache, False):  # another GPU / TensorRT wrote it: start afresh
            log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", cache_file)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UnsupportedError(f"TensorRT failed to build {name} at {precision}; the log above says why")
    new_cache = bytes(config.get_timing_cache().serialize()) if cache is not None else None
    return bytes(plan), new_cache
