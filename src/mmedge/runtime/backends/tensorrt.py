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
import platform
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from mmedge.errors import BackendError, IntegrityError, InvalidInputError, UnsupportedError, require
from mmedge.runtime.backends.base import SessionOptions, build_key, component_file
from mmedge.runtime.package import Package
from mmedge.runtime.trt_memory import DeviceMemory, cuda_call

if TYPE_CHECKING:
    from mmedge.runtime.engine_cache import DeviceIdentity, EngineCache

log = logging.getLogger(__name__)

# An engine against its source graph on sample inputs (`feeds.sample_inputs`). TF32 (TensorRT's
# default for fp32 graphs from Ampere on), FP16 accumulation and other kernels move outputs by 1e-3
# to 1e-2; a wrong build (a misread graph, a dropped layer) by O(1). An engine over its limit is not used.
ENGINE_MAX_REL_ERROR = {"fp32": 1e-2, "fp16": 2e-2, "int8": 5e-2, "int4": 1e-1}


def _trt() -> Any:  # the tensorrt module
    return require("tensorrt", "trt")


def _cudart() -> Any:  # cuda-python's runtime bindings
    require("cuda", "trt")
    try:  # cuda-python >= 12.6 moved the bindings; `cuda.cudart` is the older spelling
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return require("cuda.cudart", "trt")


_cuda = cuda_call


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
        tensorrt=_trt().__version__,
        compute_capability=compute_capability(),
        name=name.strip(),
        platform=f"{sys.platform}-{platform.machine().lower()}",
    )


class TensorRTSession:
    """One deserialized engine with one execution context and its device memory (`trt_memory`):
    buffers are allocated once per tensor and reused, copies go through pinned staging, and a KV
    cache can stay on the device across decode steps (`device_cache`). Runs are serialized by a lock."""

    def __init__(self, engine_bytes: bytes, expected_sha256: str, host_code: bool = False):
        """`host_code`: the engine was built version-compatible and carries its lean runtime, which
        TensorRT runs only when allowed; only set for an engine whose hash mmedge recorded."""
        actual = hashlib.sha256(engine_bytes).hexdigest()
        if actual != expected_sha256.lower():  # checked before TensorRT ever sees the bytes
            raise IntegrityError(
                f"engine sha256 is {actual}, expected {expected_sha256}; "
                "only engines built by mmedge (with a recorded hash) are loaded"
            )
        trt, self._cudart = _trt(), _cudart()
        self._runtime = trt.Runtime(_logger())  # must outlive the engine
        if host_code:
            self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise UnsupportedError(
                f"TensorRT {trt.__version__} could not load this engine; engines only load "
                "on the TensorRT version and GPU architecture that built them"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError("TensorRT create_execution_context failed (out of GPU memory?)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        # Shape-tensor inputs (`logits_to_keep`) are read from host memory when the run is enqueued.
        self._shape_inputs = {n for n in self.input_names if self._engine.is_shape_inference_io(n)}
        self._host_values: dict[str, np.ndarray] = {}
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
        self.memory = DeviceMemory(self._cudart, self._stream)
        self._lock = threading.Lock()

    def _checked_feeds(
        self, feeds: dict[str, np.ndarray], resident: dict[str, tuple[int, tuple[int, ...]]] | None = None
    ) -> dict[str, np.ndarray]:
        """The feeds as C-contiguous arrays of the engine's dtypes; with `resident` (inputs already
        on the device: name -> (address, shape)), every input is in one or the other."""
        given = set(feeds) | set(resident or {})
        if given != set(self.input_names) or len(given) != len(feeds) + len(resident or {}):
            raise InvalidInputError(
                f"feeds {sorted(given)} do not match the engine inputs {sorted(self.input_names)}"
            )
        arrays = {}
        for name, value in feeds.items():
            arr = np.asarray(value)
            if arr.dtype != self._dtypes[name]:
                raise InvalidInputError(
                    f"input {name!r} is {arr.dtype}; the engine takes {self._dtypes[name]}"
                )
            arrays[name] = np.ascontiguousarray(arr)
        return arrays

    def _enqueue(
        self,
        arrays: dict[str, np.ndarray],
        memory: DeviceMemory,
        resident: dict[str, tuple[int, tuple[int, ...]]],
    ) -> dict[str, tuple[int, ...]]:
        """Set shapes and addresses (uploading `arrays`; `resident` inputs are on the device already),
        give every output a device buffer in `memory` and enqueue the run; return the output shapes.
        Under the lock."""
        ctx = self._context
        bound = {n: (None, a.shape) for n, a in arrays.items()} | resident
        for name, (ptr, shape) in bound.items():
            if not ctx.set_input_shape(name, shape):
                lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
                raise InvalidInputError(
                    f"input {name!r} shape {shape} is outside the engine's profile {tuple(lo)}..{tuple(hi)}"
                )
            if ptr is None and name in self._shape_inputs:  # host memory, alive until the next run
                self._host_values[name] = arrays[name].copy()
                ptr = self._host_values[name].ctypes.data
            elif ptr is None:
                ptr = memory.upload(name, arrays[name])
            ctx.set_tensor_address(name, ptr)
        shapes = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UnsupportedError(f"output {name!r} has a data-dependent shape {shape}; not supported")
            shapes[name] = shape
            nbytes = int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize
            ctx.set_tensor_address(name, memory.device(name, nbytes))
        if not ctx.execute_async_v3(int(self._stream)):
            raise BackendError("TensorRT execute_async_v3 failed; the log says why")
        return shapes

    def _download(self, memory: DeviceMemory, outputs: dict[str, np.ndarray], shapes: dict) -> None:
        for name, out in outputs.items():
            if tuple(out.shape) != shapes[name] or out.dtype != self._dtypes[name]:
                raise InvalidInputError(
                    f"output buffer {name!r} is {out.dtype}{out.shape}; the run gives {self._dtypes[name]}{shapes[name]}"
                )
            memory.download(name, out)
        memory.synchronize()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs to the GPU, run the engine, copy every output back."""
        arrays = self._checked_feeds(feeds)
        with self._lock:  # an execution context holds per-run shapes and addresses
            shapes = self._enqueue(arrays, self.memory, {})
            outputs = {n: np.empty(s, self._dtypes[n]) for n, s in shapes.items()}
            self._download(self.memory, outputs, shapes)
        return outputs

    def run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Run, copying each named output straight into the caller's buffer."""
        arrays = self._checked_feeds(feeds)
        with self._lock:
            self._download(self.memory, outputs, self._enqueue(arrays, self.memory, {}))

    def binding(self) -> None:
        """No binding of host buffers: TensorRT runs on device memory (see `device_cache`)."""
        return None

    def device_cache(
        self, past: list[str], present: list[str], shape: tuple[int, ...]
    ) -> TensorRTDeviceCache:
        """A KV cache of `shape` (B, H, T, D) per past input that stays on this GPU across steps."""
        return TensorRTDeviceCache(self, past, present, shape)

    def close(self) -> None:
        """Free the device memory and the CUDA stream; the session is unusable afterwards."""
        if getattr(self, "_stream", None) is not None:
            self.memory.close()
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class TensorRTDeviceCache:
    """A decoder's past keys/values in device buffers of their own, bound by address every step.

    A step uploads only its own small inputs, downloads its logits and its new keys/values (the
    host cache mirrors the device one, for beam reordering and the like) and appends the new entries
    into the device buffers with one pitched device-to-device copy per tensor: O(new tokens) of
    traffic, never O(cache). Beam search's row reordering is mirrored on the device (`reorder`);
    after the host changes the cache otherwise (`KVCache.version`), `load` uploads it whole once."""

    def __init__(self, session: TensorRTSession, past: list[str], present: list[str], shape: tuple[int, ...]):
        if len(shape) != 4 or len(past) != len(present):
            raise InvalidInputError(f"a device cache needs (B, H, T, D) per past/present pair, got {shape}")
        self._session, self._past, self._present = session, list(past), list(present)
        self.shape = tuple(int(d) for d in shape)
        self.memory = DeviceMemory(session._cudart, session._stream)  # freed with this cache
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * 4
        self._ptr = {n: self.memory.device(n, nbytes) for n in self._past}
        self.version = -1  # the host cache version last uploaded
        self._fixed: dict[str, int] = {}  # id() of arrays uploaded once (cross keys/values)

    def load(self, buffers: list[np.ndarray], version: int) -> None:
        """Upload the host cache whole (once, and after the host reordered or refilled it)."""
        for name, buf in zip(self._past, buffers):
            if buf.shape != self.shape or buf.dtype != np.float32:
                raise InvalidInputError(
                    f"cache buffer {name!r} is {buf.dtype}{buf.shape}, expected {self.shape}"
                )
            self.memory.upload(name, np.ascontiguousarray(buf))
        self.memory.synchronize()
        self.version = version

    def step(
        self,
        feeds: dict[str, np.ndarray],
        fixed: dict[str, np.ndarray],
        logits: np.ndarray,
        new: list[np.ndarray],
        length: int,
    ) -> None:
        """Run over the device cache's first `length` slots: `feeds` are uploaded, `fixed` inputs
        (cross keys/values) only when a new array is given; `logits` and the new entries `new`
        (B, H, S, D) land in the host arrays, and the new entries in device slots [length, length + S)."""
        sess, (b, h, t, d) = self._session, self.shape
        s = new[0].shape[2]
        if length + s > t:
            raise InvalidInputError(f"{length} cached + {s} new tokens exceed the cache's {t} slots")
        resident = {n: (ptr, self.shape) for n, ptr in self._ptr.items()}
        arrays = sess._checked_feeds({**feeds, **fixed}, resident)
        for name, arr in fixed.items():
            if self._fixed.get(name) != id(arr):
                self.memory.upload(name, arrays[name])
                self._fixed[name] = id(arr)
            resident[name] = (self.memory.device(name, arr.nbytes), arr.shape)
            del arrays[name]
        with sess._lock:
            shapes = sess._enqueue(arrays, self.memory, resident)
            row = s * d * 4  # bytes of one (batch, head) row of new entries
            for past, present in zip(self._past, self._present):
                self.memory.copy_rows(
                    self._ptr[past] + length * d * 4,
                    t * d * 4,
                    self.memory.device(present, 0),
                    row,
                    row,
                    b * h,
                )
            sess._download(self.memory, {"logits": logits, **dict(zip(self._present, new))}, shapes)

    def reorder(self, index: np.ndarray, length: int) -> None:
        """Row i becomes row `index[i]` (beam search) on the device, by device-to-device copies of
        the first `length` slots: moved rows' sources go to a scratch buffer first, so a source that
        is itself overwritten is read before it is."""
        _, h, t, d = self.shape
        moved = [i for i in range(len(index)) if int(index[i]) != i]
        if not moved or not length:
            return
        sources = sorted({int(index[i]) for i in moved})
        row, pitch, width = h * t * d * 4, t * d * 4, length * d * 4
        for name in self._past:
            scratch = self.memory.device(f"{name}:scratch", len(sources) * row)
            for k, src in enumerate(sources):
                self.memory.copy_rows(scratch + k * row, pitch, self._ptr[name] + src * row, pitch, width, h)
            for i in moved:
                k = sources.index(int(index[i]))
                self.memory.copy_rows(self._ptr[name] + i * row, pitch, scratch + k * row, pitch, width, h)
        self.memory.synchronize()

    def close(self) -> None:
        self.memory.close()

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

    def _find(self, package: Package, key: str) -> tuple[str, dict[str, Any]] | None:
        """The engine file of `key` built for this TensorRT and GPU, with its build settings."""
        entries = sorted((t, e) for t, e in package.manifest.engines.items() if e.backend == "tensorrt")
        if not entries:  # a bundle has none: no need to ask TensorRT and the GPU
            return None
        version, cc = _trt().__version__, compute_capability()
        for _target, entry in entries:
            if entry.version == version and entry.device == cc and key in entry.files:
                return entry.files[key], entry.settings
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
        found = self._find(package, key)
        if found is not None:
            rel, settings = found
            return TensorRTSession(
                package.path(rel).read_bytes(),
                package.manifest.files[rel].sha256,
                host_code=settings.get("version_compatible") is True,
            )
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
        from mmedge.runtime.trt_plan import EngineSource, check_settings

        entry, rel = component_file(package, component, precision)
        spec = EngineSpec(
            onnx_sha256=package.manifest.files[rel].sha256,  # verified when the package was opened
            source=EngineSource.of(component, entry, precision),
            settings=settings,
            external_data=_external_data(package, rel),
            label=f"{package.manifest.name}/{component}.{precision}",
        )

        def check(engine: bytes, sha256: str) -> dict[str, Any]:
            """A new engine against its source graph in ONNX Runtime: not kept when they disagree."""
            from mmedge.runtime.backends.ort import OrtSession
            from mmedge.runtime.feeds import sample_inputs

            ref = OrtSession(_verified_onnx(package, rel), SessionOptions(threads=2), name=rel)
            err = engine_error_vs(engine, sha256, ref.run, sample_inputs(package, entry))
            if not err <= ENGINE_MAX_REL_ERROR[precision]:
                raise IntegrityError(
                    f"the TensorRT engine built here for {component}.{precision} disagrees with its source "
                    f"graph (relative error {err:.2e}, limit {ENGINE_MAX_REL_ERROR[precision]:.0e}); it is not kept"
                )
            return {"rel_error_vs_source": err}

        cache = self._cache if self._cache is not None else EngineCache()
        engine = cache.get(spec, current_device(), lambda: _verified_onnx(package, rel), check)
        return TensorRTSession(
            engine.data, engine.sha256, host_code=check_settings(settings)["version_compatible"]
        )


def engine_error_vs(
    engine: bytes,
    sha256: str,
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    feeds: list[dict[str, np.ndarray]],
) -> float:
    """The engine's largest output error against `reference` (its source graph run another way),
    relative to each output's largest magnitude, over `feeds`."""
    from mmedge.runtime.feeds import relative_error

    session = TensorRTSession(engine, sha256)
    try:
        return max(relative_error(reference(f), session.run(f)) for f in feeds)
    finally:
        session.close()


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
