"""Native TensorRT backend: run engines that mmedge built (TensorRT 10 Python API + cuda-python).

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
import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from mmedge.errors import BackendError, IntegrityError, InvalidInputError, UnsupportedError, require
from mmedge.runtime.backends.base import SessionOptions, build_key, component_file
from mmedge.runtime.package import Package

if TYPE_CHECKING:
    from mmedge.runtime.engine_cache import DeviceIdentity, EngineCache

log = logging.getLogger(__name__)


def _trt() -> Any:  # the tensorrt module
    return require("tensorrt", "trt")


def _cudart() -> Any:  # cuda-python's runtime bindings
    require("cuda", "trt")
    try:  # cuda-python >= 12.6 moved the bindings; `cuda.cudart` is the older spelling
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return require("cuda.cudart", "trt")


def _cuda(result: Any, what: str) -> Any:
    """cuda-python calls return (error, *values): raise on error, return the value(s)."""
    err, *values = result
    if err != type(err).cudaSuccess:
        raise BackendError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else tuple(values)


@functools.lru_cache(maxsize=1)
def _logger() -> Any:  # a trt.ILogger
    trt = _trt()
    sev = trt.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: logging.CRITICAL,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.DEBUG,
        sev.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):  # type: ignore[name-defined]  # trt is imported at run time
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
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


def current_device() -> DeviceIdentity:
    """The TensorRT version and the current GPU (compute capability and name): what an engine built
    here is tied to, and what the engine cache keys by."""
    from mmedge.runtime.engine_cache import DeviceIdentity

    cudart = _cudart()
    dev = _cuda(cudart.cudaGetDevice(), "cudaGetDevice (is there a CUDA GPU?)")
    props = _cuda(cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
    raw = props.name  # a NUL-padded char[256]
    name = raw.split(b"\0", 1)[0].decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return DeviceIdentity(
        tensorrt=_trt().__version__, compute_capability=compute_capability(), name=name.strip()
    )


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
        # -1 marks a dynamic dim in TensorRT; the protocol spells it None
        self.output_shapes = {
            n: tuple(None if d < 0 else int(d) for d in self._engine.get_tensor_shape(n))
            for n in self.output_names
        }
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
                    raise BackendError("TensorRT execute_async_v3 failed; the log says why")
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

    def binding(self) -> None:
        """No persistent binding: inputs and outputs cross host <-> device on every run."""
        return None

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
    """Loads the engine a package lists for this exact TensorRT version and GPU architecture; for a
    "tensorrt" device bundle, which carries ONNX instead, the engine built here on first use
    (`runtime/engine_cache.py`)."""

    name = "tensorrt"

    def __init__(self, cache: EngineCache | None = None) -> None:
        self._cache = cache  # None: the store's cache with TensorRT's builder, made per load

    def _find(self, package: Package, key: str) -> str | None:
        entries = sorted((t, e) for t, e in package.manifest.engines.items() if e.backend == "tensorrt")
        if not entries:  # a bundle has none: no need to ask TensorRT and the GPU
            return None
        version, cc = _trt().__version__, compute_capability()
        for _target, entry in entries:
            if entry.version == version and entry.device == cc and key in entry.files:
                return entry.files[key]
        return None

    def has_build(
        self, package: Package, component: str, precision: str, variant: str, options: SessionOptions
    ) -> bool:
        return self._find(package, build_key(component, precision, variant)) is not None

    def load(
        self, package: Package, component: str, precision: str, options: SessionOptions, variant: str = ""
    ) -> TensorRTSession:
        """Find `<component>.<precision>` among the package's engines for this device and load it;
        in a "tensorrt" bundle without one, build it from the component's ONNX (cached)."""
        key = build_key(component, precision, variant)
        rel = self._find(package, key)
        if rel is not None:
            return TensorRTSession(package.path(rel).read_bytes(), package.manifest.files[rel].sha256)
        bundle = package.manifest.bundle
        if bundle is not None and bundle.target == "tensorrt":
            if variant:
                raise UnsupportedError(f"TensorRT builds no {variant!r} variant of {component}.{precision}")
            return self._built_here(package, component, precision, dict(bundle.settings))
        have = {
            t: (e.version, e.device, sorted(e.files))
            for t, e in package.manifest.engines.items()
            if e.backend == "tensorrt"
        }
        raise UnsupportedError(
            f"no TensorRT engine for {key} built with TensorRT {_trt().__version__} for compute capability "
            f"{compute_capability()}; the package has {have or 'no TensorRT engines'}; build one with "
            "`mmedge build PKG --backend tensorrt`"
        )

    def _built_here(
        self, package: Package, component: str, precision: str, settings: dict[str, Any]
    ) -> TensorRTSession:
        """The component's engine from this device's cache, built from its verified ONNX on a miss."""
        from mmedge.runtime.engine_cache import EngineCache, EngineSpec
        from mmedge.runtime.trt_build import profile

        entry, rel = component_file(package, component, precision)
        spec = EngineSpec(
            onnx_sha256=package.manifest.files[rel].sha256,  # verified when the package was opened
            precision=precision,
            profile=profile(entry),
            settings=settings,
            external_data=_external_data(package, rel),
            label=f"{package.manifest.name}/{component}.{precision}",
        )
        cache = self._cache if self._cache is not None else EngineCache()
        engine = cache.get(spec, current_device(), lambda: _verified_onnx(package, rel))
        return TensorRTSession(engine.data, engine.sha256)


def _external_data(package: Package, rel: str) -> dict[str, str]:
    """The sha256 of each listed file holding the model's external tensors (part of the engine's key)."""
    import onnx

    from mmedge.runtime.onnx_files import external_ref, iter_tensors, parse_model, read_listed

    files = package.manifest.files
    model = parse_model(read_listed(package.root, rel, files[rel]), rel)
    locations = {
        external_ref(t, rel, files).location
        for t in iter_tensors(model)
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    return {loc: files[loc].sha256 for loc in sorted(locations)}


def _verified_onnx(package: Package, rel: str) -> bytes:
    """A self-contained model from bytes hashed as they were read (TensorRT never gets a path)."""
    from mmedge.runtime.onnx_files import read_model

    model = read_model(package.root, package.manifest, rel, inline=True)
    if model.initializers:
        raise UnsupportedError(
            f"{rel} is over protobuf's 2 GiB with its weights; TensorRT builds it only from a file, "
            "which a bundle's device does not hand it; build its engines on a host (`mmedge build`)"
        )
    return model.model
