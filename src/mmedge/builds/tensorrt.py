"""TensorRT engine builds: each component's ONNX (Q/DQ for INT8, block-wise INT4 weights, an fp16
graph for FP16) -> a strongly typed engine with one optimization profile (`runtime/trt_plan.py`),
checked against its source graph on sample inputs like ORT builds (`engine_error`).

Engines are executable artifacts tied to one TensorRT version and one GPU architecture; they are
written under `engines/<target>/`, where the target names both (`engine_target`), and their sha256
is recorded so that the runtime (`runtime.backends.tensorrt`) loads only what mmedge built. A
precision TensorRT cannot build (an INT8 weight-only LLM) is skipped with the reason, and the
other precisions of the same target are kept when one is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from mmedge.builds.base import BuildRequest, BuildResult, precisions_to_build
from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.runtime.backends.tensorrt import ENGINE_MAX_REL_ERROR, _trt, compute_capability
from mmedge.runtime.package import Package, sha256_file
from mmedge.runtime.staging import write_atomic
from mmedge.runtime.trt_build import build_network
from mmedge.runtime.trt_plan import (
    ApiGeneration,
    EnginePlan,
    EngineSource,
    api_generation,
    check_settings,
    plan_engine,
)

log = logging.getLogger(__name__)


def engine_error(
    pkg: Package, component: str, source: Path, engine: Path, sha256: str, threads: int = 2
) -> float:
    """The engine's largest output error against its source graph (run by ONNX Runtime on the CPU
    with full optimizations), relative to each output's largest magnitude, on the component's
    sample inputs."""
    from mmedge.builds.sessions import ort_session
    from mmedge.runtime.backends.tensorrt import engine_error_vs
    from mmedge.runtime.feeds import sample_inputs

    ort = ort_session(source, threads)
    names = [o.name for o in ort.get_outputs()]
    return engine_error_vs(
        engine.read_bytes(),
        sha256,
        lambda feed: dict(zip(names, ort.run(names, feed))),
        sample_inputs(pkg, pkg.manifest.components[component]),
    )


def engine_target(settings: dict, version: str | None = None, capability: str | None = None) -> str:
    """Engine directory name for a GPU, a TensorRT and build settings: "sm87-trt10.3-1a2b3c4d"
    (this GPU and TensorRT unless given)."""
    try:
        blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise InvalidInputError(
            f"engine settings must be JSON values (str, number, list, dict): {exc}"
        ) from None
    trt_minor = ".".join((version or _trt().__version__).split(".")[:2])
    sm = (capability or compute_capability()).replace(".", "")
    return f"sm{sm}-trt{trt_minor}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _graphs(pkg: Package, precision: str) -> list[tuple[EngineSource, str, Any]]:
    """(source, graph file, parsed graph) of every component precision a build request covers; the
    graph only, its external weights are not read."""
    from mmedge.runtime.onnx_files import parse_model, read_listed

    out = []
    for name, entry in pkg.manifest.components.items():
        for p in precisions_to_build(entry, precision):
            rel = entry.precisions[p].file
            model = parse_model(read_listed(pkg.root, rel, pkg.manifest.files[rel]), rel)
            out.append((EngineSource.of(name, entry, p), rel, model))
    return out


def package_plans(
    pkg: Package, precision: str, settings: dict[str, Any], api: ApiGeneration
) -> list[EnginePlan]:
    """The engine plan of every component precision a build request covers."""
    return [plan_engine(source, model, settings, api) for source, _, model in _graphs(pkg, precision)]


def build_engine(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    plan: EnginePlan,
    timing_cache_path: str | os.PathLike | None = None,
) -> dict:
    """Build one engine from an ONNX file by `plan`; return its build record (TensorRT version,
    compute capability, the plan, the ONNX sha256 and the engine's sha256 and size)."""
    trt = _trt()
    cc = compute_capability()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise InvalidInputError(f"ONNX file {str(onnx_path)!r} does not exist")
    cache_file = Path(timing_cache_path) if timing_cache_path is not None else None
    old_cache = None
    if cache_file is not None:
        old_cache = cache_file.read_bytes() if cache_file.is_file() else b""
    # from the file so external weights resolve
    data, new_cache = build_network(
        lambda parser: parser.parse_from_file(str(onnx_path)), onnx_path.name, plan, old_cache, cache_file
    )
    write_atomic(out_path, data)
    if cache_file is not None and new_cache is not None:
        write_atomic(cache_file, new_cache)
    return {  # "backend", "version", "device" as in the manifest's engine entries
        "backend": "tensorrt",
        "version": trt.__version__,
        "device": cc,
        "plan": plan.record(),
        "onnx_sha256": sha256_file(onnx_path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


class TensorRTBuilder:
    """Engines for this GPU and TensorRT, one optimization profile from the manifest's dim ranges."""

    name = "tensorrt"

    def __init__(self) -> None:
        from mmedge.errors import require

        require("tensorrt", "trt")  # refuse up front, before the package is staged, where TensorRT is missing

    def build(self, request: BuildRequest) -> BuildResult:
        pkg, tmp = request.package, request.staging
        settings = check_settings(request.options.get("settings", {}))
        version = _trt().__version__
        target = engine_target(settings)
        plans = package_plans(pkg, request.precision, settings, api_generation(version))
        if not plans:
            have = sorted({p for c in pkg.manifest.components.values() for p in c.precisions})
            raise UnsupportedError(
                f"no component has a {request.precision!r} graph to build; the package has {have} "
                "(a strongly typed build runs each graph in its own types: fp32 graphs run fp32/TF32)"
            )
        records: dict[str, Any] = {}
        files: dict[str, str] = {}
        for plan in plans:
            key = f"{plan.component}.{plan.precision}"
            if plan.skip:
                request.say(f"skipped {key}: {plan.skip}")
                records[key] = {"skipped": plan.skip}
                continue
            rel = f"engines/{target}/{key}.plan"  # replaces only this build's file: others stay
            source = pkg.manifest.components[plan.component].precisions[plan.precision].file
            try:
                record = build_engine(tmp / source, tmp / rel, plan, tmp / "engines" / "timing.cache")
                err = engine_error(
                    pkg, plan.component, tmp / source, tmp / rel, record["sha256"], request.threads
                )
                if not err <= ENGINE_MAX_REL_ERROR[plan.precision]:
                    (tmp / rel).unlink()
                    raise UnsupportedError(
                        f"the engine disagrees with its source graph (relative error {err:.2e}, limit "
                        f"{ENGINE_MAX_REL_ERROR[plan.precision]:.0e})"
                    )
            except UnsupportedError as exc:  # one precision TensorRT cannot build does not stop the rest
                request.say(f"skipped {key}: {exc}")
                records[key] = {"skipped": str(exc)}
                continue
            records[key] = {**record, "rel_error_vs_source": err}
            files[key] = rel
            request.say(f"built {key} engine (relative error vs source {err:.1e})")
        if not files:
            raise UnsupportedError(f"TensorRT built none of {sorted(records)}: {records}")
        return BuildResult(target, version, compute_capability(), settings, files, records)


def build_plan(
    package: str | os.PathLike,
    precision: str = "auto",
    settings: dict[str, Any] | None = None,
    versions: tuple[str, ...] = ("10.3.0", "11.1.0"),
    capability: str = "8.7",
    gpu_name: str = "Orin",
    platform: str = "linux-aarch64",
) -> list[dict[str, Any]]:
    """What `mmedge build --backend tensorrt` would do on each TensorRT version, for a GPU described
    by `capability` / `gpu_name` / `platform`, without TensorRT or a GPU: per component and
    precision, the network and builder flags, the optimization profile with shape-tensor values,
    the engine directory of a host build and the engine cache key of a device bundle's build."""
    from mmedge.runtime.backends.tensorrt import _external_data
    from mmedge.runtime.engine_cache import DeviceIdentity, EngineSpec, engine_key
    from mmedge.runtime.package import verify_package
    from mmedge.runtime.store import resolve

    pkg = verify_package(resolve(package))
    checked = check_settings(settings or {})
    rows = []
    graphs = _graphs(pkg, precision)  # read once, planned for every version
    external = {rel: _external_data(pkg, rel) for _, rel, _ in graphs}
    for version in versions:
        api = api_generation(version)
        device = DeviceIdentity(version, capability, gpu_name, platform)
        for source, rel, model in graphs:
            plan = plan_engine(source, model, checked, api)
            spec = EngineSpec(pkg.manifest.files[rel].sha256, source, checked, external[rel])
            rows.append(
                {
                    **plan.record(),
                    "tensorrt": version,
                    "engine_dir": f"engines/{engine_target(checked, version, capability)}",
                    "cache_key": engine_key(spec, device),
                }
            )
    return rows
