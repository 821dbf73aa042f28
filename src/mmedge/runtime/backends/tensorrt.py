"""Native TensorRT backend: build engines from ONNX and run them (TensorRT 10 Python API + cuda-python).

Engines (`.plan`) are executable artifacts tied to one TensorRT version and one GPU architecture, so
they live under `engines/<target>/` where the target names both (see `engine_target`), and a session
only deserializes bytes whose sha256 matches what mmedge recorded when it built them.

Neither `tensorrt` nor `cuda` is imported at module level: both come from the `[trt]` extra and are
imported by the function that needs them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmedge.errors import IntegrityError, InvalidInputError, MmedgeError, UnsupportedError, require
from mmedge.runtime.package import sha256_file

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# INT8 comes from the explicit Q/DQ nodes of the int8 ONNX; the flag lets TensorRT run them in INT8.
# Layers outside Q/DQ pairs stay FP32 (no implicit calibration: TensorRT 10 deprecates it).
_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}
DEFAULT_WORKSPACE = 2 << 30  # bytes; Jetson Orin Nano has 8 GiB shared with the CPU


def _trt():
    return require("tensorrt", "trt")


def _cudart():
    require("cuda", "trt")
    try:  # cuda-python >= 12.6 moved the bindings; `cuda.cudart` is the older spelling
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return require("cuda.cudart", "trt")


def _cuda(result, what: str):
    """cuda-python calls return (error, *values): raise on error, return the value(s)."""
    err, *values = result
    if err != type(err).cudaSuccess:
        raise MmedgeError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else tuple(values)


@functools.lru_cache(maxsize=1)
def _logger():
    trt = _trt()
    sev = trt.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: logging.CRITICAL,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.DEBUG,
        sev.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

    return _Logger()


def compute_capability() -> str:
    """Compute capability of the current CUDA device, e.g. "8.7" for Jetson Orin."""
    cudart = _cudart()
    dev = _cuda(cudart.cudaGetDevice(), "cudaGetDevice (is there a CUDA GPU?)")
    attr = cudart.cudaDeviceAttr
    major = _cuda(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, dev), "device query")
    minor = _cuda(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, dev), "device query")
    return f"{major}.{minor}"


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


def _check_dims(dims: dict) -> dict[str, list[list[int]]]:
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


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp name beside `path`, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    profile_dims = _check_dims(dims)
    trt = _trt()
    cc = compute_capability()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise InvalidInputError(f"ONNX file {str(onnx_path)!r} does not exist")
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file so external weights resolve
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise UnsupportedError(
            f"TensorRT cannot parse {onnx_path.name}; run the export lint "
            f"(mmedge.export.trt_lint) for details. Parser errors:\n{errors}"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for flag in _FLAGS[precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    inputs = {t.name: tuple(t.shape) for t in (network.get_input(i) for i in range(network.num_inputs))}
    if unknown := sorted(set(profile_dims) - set(inputs)):
        raise InvalidInputError(
            f"dims name {unknown}, which are not inputs of {onnx_path.name}; inputs: {sorted(inputs)}"
        )
    if profile_dims:
        profile = builder.create_optimization_profile()
        for name, shape in inputs.items():
            if name not in profile_dims:
                if any(d < 0 for d in shape):
                    raise InvalidInputError(
                        f"input {name!r} has dynamic shape {shape}; give its (min, opt, max) in dims"
                    )
                profile.set_shape(name, shape, shape, shape)
                continue
            lo, opt, hi = profile_dims[name]
            if len(lo) != len(shape) or any(
                d >= 0 and not lo[i] == opt[i] == hi[i] == d for i, d in enumerate(shape)
            ):
                raise InvalidInputError(
                    f"dims[{name!r}] = {profile_dims[name]} does not fit the input's shape {shape}"
                )
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    elif dynamic := sorted(n for n, s in inputs.items() if any(d < 0 for d in s)):
        raise InvalidInputError(f"inputs {dynamic} have dynamic shapes; give their (min, opt, max) in dims")
    cache = None
    if timing_cache_path is not None:
        cache_file = Path(timing_cache_path)
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        if not config.set_timing_cache(cache, False):  # another GPU / TensorRT wrote it: start afresh
            log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", cache_file)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UnsupportedError(
            f"TensorRT failed to build {onnx_path.name} at {precision}; the log above says why"
        )
    data = bytes(plan)
    _atomic_write(out_path, data)
    if cache is not None:
        _atomic_write(Path(timing_cache_path), bytes(config.get_timing_cache().serialize()))
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


class TensorRTSession:
    """One deserialized engine with one execution context; `run` is serialized by a lock."""

    def __init__(self, engine_bytes: bytes, expected_sha256: str):
        actual = hashlib.sha256(engine_bytes).hexdigest()
        if actual != expected_sha256.lower():  # checked before TensorRT ever sees the bytes
            raise IntegrityError(
                f"engine sha256 is {actual}, expected {expected_sha256}; "
                "only engines built by mmedge (with a recorded hash) are loaded"
            )
        trt, self._cudart = _trt(), _cudart()
        self._runtime = trt.Runtime(_logger())  # must outlive the engine
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise UnsupportedError(
                f"TensorRT {trt.__version__} could not load this engine; engines only load "
                "on the TensorRT version and GPU architecture that built them"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self._dtypes = {}
        for n in names:
            try:
                self._dtypes[n] = np.dtype(trt.nptype(self._engine.get_tensor_dtype(n)))
            except TypeError:
                raise UnsupportedError(
                    f"engine tensor {n!r} is {self._engine.get_tensor_dtype(n)}, "
                    "which has no numpy type; export it as FP32/FP16/INT"
                ) from None
        self._stream = _cuda(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs to the GPU, run the engine, copy every output back."""
        if set(feeds) != set(self.input_names):
            raise InvalidInputError(
                f"feeds {sorted(feeds)} do not match the engine inputs {sorted(self.input_names)}"
            )
        arrays = {}
        for name in self.input_names:
            arr = np.asarray(feeds[name])
            if arr.dtype != self._dtypes[name]:
                raise InvalidInputError(
                    f"input {name!r} is {arr.dtype}; the engine takes {self._dtypes[name]}"
                )
            arrays[name] = np.ascontiguousarray(arr)
        cudart, ctx, stream = self._cudart, self._context, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:  # an execution context holds per-run shapes and addresses
            ptrs: list[int] = []
            try:
                for name, arr in arrays.items():
                    if not ctx.set_input_shape(name, arr.shape):
                        lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
                        raise InvalidInputError(
                            f"input {name!r} shape {arr.shape} is outside the engine's "
                            f"profile {tuple(lo)}..{tuple(hi)}"
                        )
                    ptrs.append(_cuda(cudart.cudaMalloc(max(arr.nbytes, 1)), "cudaMalloc"))
                    _cuda(
                        cudart.cudaMemcpyAsync(ptrs[-1], arr.ctypes.data, arr.nbytes, h2d, stream),
                        "copy to GPU",
                    )
                    ctx.set_tensor_address(name, ptrs[-1])
                outputs = {}
                for name in self.output_names:
                    shape = tuple(ctx.get_tensor_shape(name))
                    if any(d < 0 for d in shape):
                        raise UnsupportedError(
                            f"output {name!r} has a data-dependent shape {shape}; not supported"
                        )
                    outputs[name] = np.empty(shape, self._dtypes[name])
                    ptrs.append(_cuda(cudart.cudaMalloc(max(outputs[name].nbytes, 1)), "cudaMalloc"))
                    ctx.set_tensor_address(name, ptrs[-1])
                if not ctx.execute_async_v3(int(stream)):
                    raise MmedgeError("TensorRT execute_async_v3 failed; the log says why")
                for out, ptr in zip(outputs.values(), ptrs[len(arrays) :]):
                    _cuda(
                        cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, stream), "copy from GPU"
                    )
                _cuda(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            finally:
                for ptr in ptrs:  # cudaFree waits for the work that uses the buffer
                    cudart.cudaFree(ptr)
        return outputs

    def run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """`run`, then copy into the caller's buffers. (Inputs still cross host->device every call; a
        device-resident KV cache for the TensorRT backend is not implemented yet.)"""
        for name, out in self.run(feeds).items():
            if name in outputs:
                np.copyto(outputs[name], out)

    def close(self) -> None:
        """Release the CUDA stream; the session is unusable afterwards."""
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TensorRTBackend:
    """Loads the engine a package lists for this exact TensorRT version and GPU architecture."""

    name = "tensorrt"

    def load(self, package, component: str, precision: str, options=None) -> TensorRTSession:
        """Find `<component>.<precision>` among the package's engines for this device and load it."""
        key, version, cc = f"{component}.{precision}", _trt().__version__, compute_capability()
        for _target, entry in sorted(package.manifest.engines.items()):
            usable = entry.backend == "tensorrt" and entry.version == version and entry.device == cc
            if usable and key in entry.files:
                rel = entry.files[key]
                return TensorRTSession(package.path(rel).read_bytes(), package.manifest.files[rel].sha256)
        have = {
            t: (e.version, e.device, sorted(e.files))
            for t, e in package.manifest.engines.items()
            if e.backend == "tensorrt"
        }
        raise UnsupportedError(
            f"no TensorRT engine for {key} built with TensorRT {version} for compute capability {cc}; "
            f"the package has {have or 'no TensorRT engines'}; build one with the TensorRT backend"
        )
