"""TensorRT engine builds: ONNX (Q/DQ for INT8) -> a serialized engine with one optimization profile.

Engines are executable artifacts tied to one TensorRT version and one GPU architecture; they are
written under `engines/<target>/`, where the target names both (`engine_target`), and their sha256
is recorded so that the runtime (`runtime.backends.tensorrt`) loads only what mmedge built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from mmedge.builds.base import BuildRequest, BuildResult, precisions_to_build, profile
from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.runtime.backends.tensorrt import _trt, compute_capability
from mmedge.runtime.package import sha256_file
from mmedge.runtime.staging import write_atomic
from mmedge.runtime.trt_build import (
    DEFAULT_WORKSPACE,
    PRECISIONS,
    build_network,
    check_dims,
    trt_precision,
)
from mmedge.runtime.trt_build import build_engine_bytes as build_engine_bytes  # the device side, re-exported
from mmedge.runtime.trt_build import device_builder as device_builder

log = logging.getLogger(__name__)


def engine_target(settings: dict) -> str:
    """Engine directory name for this GPU, this TensorRT and these build settings: "sm87-trt10.3-1a2b3c4d"."""
    try:
        blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise InvalidInputError(
            f"engine settings must be JSON values (str, number, list, dict): {exc}"
        ) from None
    trt_minor = ".".join(_trt().__version__.split(".")[:2])
    sm = compute_capability().replace(".", "")
    return f"sm{sm}-trt{trt_minor}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def build_engine(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    dims: dict[str, Sequence[Sequence[int]]],
    precision: str = "fp16",
    timing_cache_path: str | os.PathLike | None = None,
    *,
    workspace_bytes: int = DEFAULT_WORKSPACE,
) -> dict:
    """Build a TensorRT engine from ONNX with one optimization profile; return its build record.

    `dims` maps each dynamic input to its (min, opt, max) shapes. The record holds the TensorRT
    version, compute capability, settings, the ONNX sha256 and the plan's sha256 and size.
    """
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision {precision!r} is not one of {PRECISIONS}")
    profile_dims = check_dims(dims)
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
        lambda parser: parser.parse_from_file(str(onnx_path)),
        onnx_path.name,
        profile_dims,
        precision,
        workspace_bytes,
        old_cache,
        cache_file,
    )
    write_atomic(out_path, data)
    if cache_file is not None and new_cache is not None:
        write_atomic(cache_file, new_cache)
    return {  # "backend", "version", "device" as in the manifest's engine entries
        "backend": "tensorrt",
        "version": trt.__version__,
        "device": cc,
        "precision": precision,
        "dims": profile_dims,
        "workspace_bytes": int(workspace_bytes),
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
        import shutil

        pkg, tmp = request.package, request.staging
        records, files = {}, {}
        for name, entry in pkg.manifest.components.items():
            for p in precisions_to_build(entry, request.precision):
                build_precision = trt_precision(p)
                rel = f"engines/pending/{name}.{p}.plan"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                records[f"{name}.{p}"] = build_engine(
                    tmp / entry.precisions[p].file,
                    tmp / rel,
                    profile(entry),
                    precision=build_precision,
                    timing_cache_path=tmp / "engines" / "timing.cache",
                )
                files[f"{name}.{p}"] = rel
                request.say(f"built {name}.{p} engine ({build_precision})")
        if not records:
            raise UnsupportedError(f"no component has a {request.precision!r} build to compile")
        first = next(iter(records.values()))
        settings = {"workspace_bytes": first.get("workspace_bytes")}
        target = engine_target(settings)
        final = tmp / "engines" / target
        if final.exists():  # a rebuild for the same target replaces the old engines
            shutil.rmtree(final)
        (tmp / "engines" / "pending").rename(final)
        files = {k: v.replace("engines/pending/", f"engines/{target}/") for k, v in files.items()}
        return BuildResult(target, str(first["version"]), str(first["device"]), settings, files, records)
