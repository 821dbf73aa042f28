"""Building a TensorRT engine from an ONNX graph by its plan (`trt_plan.EnginePlan`).

Shared by `mmedge build --backend tensorrt` on a host (`builds/tensorrt.py`, from a package's files)
and by a "tensorrt" device bundle, which builds its engines on the device on first use from bytes
the runtime hashed as it read them (`runtime/engine_cache.py`). `tensorrt` is imported by the
functions that need it (the `[trt]` extra). Every call whose failure TensorRT reports as None or
False is checked here and raised as a typed error naming the call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mmedge.errors import BackendError, InvalidInputError, UnsupportedError
from mmedge.runtime.backends.tensorrt import _logger, _trt
from mmedge.runtime.trt_plan import EnginePlan, EngineSource, api_generation, plan_engine

log = logging.getLogger(__name__)


def _checked(value: Any, call: str) -> Any:
    if value is None or value is False:
        raise BackendError(f"TensorRT {call} failed; the TensorRT log above says why")
    return value


def network_flags(trt: Any, plan: EnginePlan) -> int:
    """The network-creation bit mask of the plan's flags (STRONGLY_TYPED on 10.x, none on 11)."""
    mask = 0
    for name in plan.network_flags:
        member = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if member is None:
            raise UnsupportedError(f"TensorRT {trt.__version__} has no NetworkDefinitionCreationFlag.{name}")
        mask |= 1 << int(member)
    return mask


def device_builder(model: bytes, source: EngineSource, settings: Mapping[str, Any]) -> bytes:
    """The engine cache's builder (`runtime.engine_cache.EngineBuilder`): a serialized engine from a
    self-contained ONNX model in memory (no file is read), planned for the TensorRT present."""
    from mmedge.runtime.onnx_files import parse_model

    name = f"{source.component}.{source.precision}"
    plan = plan_engine(source, parse_model(model, name), settings, api_generation(_trt().__version__))
    data, _ = build_network(lambda parser: parser.parse(model), name, plan)
    return data


def build_network(
    parse: Callable[[Any], bool],
    name: str,
    plan: EnginePlan,
    timing_cache: bytes | None = None,
    cache_file: Path | None = None,
) -> tuple[bytes, bytes | None]:
    """Parse (by `parse(parser)`), configure by `plan` and build; return the plan and the updated
    timing cache."""
    if plan.skip:
        raise UnsupportedError(plan.skip)
    trt = _trt()
    if api_generation(trt.__version__).version != plan.tensorrt:
        raise UnsupportedError(f"this plan is for TensorRT {plan.tensorrt}, not {trt.__version__}")
    logger = _logger()
    builder = _checked(trt.Builder(logger), "Builder")
    network = _checked(builder.create_network(network_flags(trt, plan)), "create_network")
    parser = _checked(trt.OnnxParser(network, logger), "OnnxParser")
    if not parse(parser):
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise UnsupportedError(
            f"TensorRT cannot parse {name}; run the export lint "
            f"(mmedge.export.trt_lint) for details. Parser errors:\n{errors}"
        )
    config = _checked(builder.create_builder_config(), "create_builder_config")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_bytes))
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.hardware_compatibility != "none":
        config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, plan.hardware_compatibility.upper()
        )
    _set_profile(trt, builder, network, config, plan, name)
    cache = None
    if timing_cache is not None:
        cache = _checked(config.create_timing_cache(timing_cache), "create_timing_cache")
        if not config.set_timing_cache(cache, False):  # another GPU / TensorRT wrote it: start afresh
            log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", cache_file)
            cache = _checked(config.create_timing_cache(b""), "create_timing_cache")
            _checked(config.set_timing_cache(cache, False), "set_timing_cache")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UnsupportedError(f"TensorRT failed to build {name} at {plan.precision}; the log above says why")
    new_cache = bytes(config.get_timing_cache().serialize()) if cache is not None else None
    return bytes(serialized), new_cache


def _set_profile(trt: Any, builder: Any, network: Any, config: Any, plan: EnginePlan, name: str) -> None:
    """One optimization profile: shapes of every input, values of every shape-tensor input."""
    tensors = {t.name: t for t in (network.get_input(i) for i in range(network.num_inputs))}
    inputs = {n: tuple(t.shape) for n, t in tensors.items()}
    if unknown := sorted(set(plan.profile) - set(inputs)):
        raise InvalidInputError(
            f"dims name {unknown}, which are not inputs of {name}; inputs: {sorted(inputs)}"
        )
    shape_inputs = sorted(n for n, t in tensors.items() if t.is_shape_tensor)
    if missing := sorted(set(shape_inputs) - set(plan.shape_values)):
        raise UnsupportedError(
            f"TensorRT reads inputs {missing} of {name} as shape tensors, and the plan has no value range "
            "for them"
        )
    dynamic = sorted(n for n, s in inputs.items() if any(d < 0 for d in s) and n not in plan.profile)
    if dynamic:
        raise InvalidInputError(f"inputs {dynamic} have dynamic shapes; give their (min, opt, max) in dims")
    if not plan.profile and not shape_inputs:
        return
    profile = _checked(builder.create_optimization_profile(), "create_optimization_profile")
    for input_name, shape in inputs.items():
        lo, opt, hi = plan.profile.get(input_name, (shape, shape, shape))
        if len(lo) != len(shape) or any(
            d >= 0 and not lo[i] == opt[i] == hi[i] == d for i, d in enumerate(shape)
        ):
            raise InvalidInputError(
                f"dims[{input_name!r}] = {plan.profile[input_name]} does not fit the input's shape {shape}"
            )
        profile.set_shape(input_name, lo, opt, hi)
        if input_name in shape_inputs:
            profile.set_shape_input(input_name, *plan.shape_values[input_name])
    if config.add_optimization_profile(profile) < 0:
        raise BackendError(f"TensorRT refused the optimization profile of {name} (add_optimization_profile)")
