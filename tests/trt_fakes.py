"""Stand-ins for `tensorrt` and cuda-python's runtime that follow the real bindings of one API
generation (TensorRT 10.3 or 11.1): every object answers only the members that generation's
bindings define (`trt_members.MEMBERS`), so a call that does not exist there fails a test.

The stand-ins run for real, on the CPU: a "built engine" is the ONNX graph with its plan, executed
by ONNX Runtime; "device memory" is host memory the fake CUDA allocates and tracks, so copies are
checked for direction (a device address where one is due) and counted (`FakeCuda.traffic`).
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import sys
import types
from collections import Counter
from typing import Any

import numpy as np
import onnx
from trt_members import MEMBERS

_MAGIC = b"FAKEPLAN\n"


class _Strict:
    """Attribute access limited to the bindings' members of `_api` (private names are the fake's own)."""

    _api = ""
    _version = ""

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            object.__getattribute__(self, "_check")(name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_"):
            self._check(name)
        object.__setattr__(self, name, value)

    def _check(self, name: str) -> None:
        allowed = MEMBERS[self._version][self._api]
        if name not in allowed:
            raise AttributeError(f"TensorRT {self._version}: {self._api} has no member {name!r}")


def _enum(version: str, name: str) -> Any:
    """An enum with only the members the generation's bindings list."""
    return enum.IntEnum(name, {m: i for i, m in enumerate(MEMBERS[version][name])})


class FakeCuda:
    """cuda-python's runtime over host memory: allocations are numpy buffers the fake owns."""

    class cudaError_t(enum.IntEnum):  # noqa: N801  (cuda-python's spelling)
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    cudaDeviceAttr = types.SimpleNamespace(
        cudaDevAttrComputeCapabilityMajor="major", cudaDevAttrComputeCapabilityMinor="minor"
    )

    def __init__(self) -> None:
        self.device: dict[int, np.ndarray] = {}
        self.pinned: dict[int, np.ndarray] = {}
        self.traffic: Counter[str] = Counter()  # bytes by direction; "pageable" host copies too
        self.calls: Counter[str] = Counter()
        ok = self.cudaError_t.cudaSuccess
        self.cudaGetDevice = lambda: (ok, 0)
        self.cudaDeviceGetAttribute = lambda attr, dev: (ok, {"major": 8, "minor": 7}[attr])
        self.cudaGetDeviceProperties = lambda dev: (
            ok,
            types.SimpleNamespace(name=b"Orin (nvgpu)" + b"\0" * 244),
        )
        self.cudaStreamCreate = lambda: (ok, 7)
        self.cudaStreamDestroy = lambda stream: (ok,)
        self.cudaStreamSynchronize = lambda stream: (ok,)

    def _alloc(self, table: dict[int, np.ndarray], nbytes: int, what: str) -> tuple[Any, int]:
        self.calls[what] += 1
        buf = np.zeros(int(nbytes), np.uint8)
        table[buf.ctypes.data] = buf
        return self.cudaError_t.cudaSuccess, buf.ctypes.data

    def cudaMalloc(self, nbytes: int) -> tuple[Any, int]:
        return self._alloc(self.device, nbytes, "cudaMalloc")

    def cudaMallocHost(self, nbytes: int) -> tuple[Any, int]:
        return self._alloc(self.pinned, nbytes, "cudaMallocHost")

    def cudaFree(self, ptr: int) -> tuple[Any]:
        self.calls["cudaFree"] += 1
        del self.device[ptr]
        return (self.cudaError_t.cudaSuccess,)

    def cudaFreeHost(self, ptr: int) -> tuple[Any]:
        del self.pinned[ptr]
        return (self.cudaError_t.cudaSuccess,)

    def owner(self, ptr: int, nbytes: int) -> str:
        """ "device", "pinned" or "pageable": where [ptr, ptr + nbytes) lies."""
        for name, table in (("device", self.device), ("pinned", self.pinned)):
            for base, buf in table.items():
                if base <= ptr and ptr + nbytes <= base + buf.nbytes:
                    return name
        return "pageable"

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: Any, stream: Any) -> tuple[Any]:
        want = {
            self.cudaMemcpyKind.cudaMemcpyHostToDevice: ("host", "device"),
            self.cudaMemcpyKind.cudaMemcpyDeviceToHost: ("device", "host"),
            self.cudaMemcpyKind.cudaMemcpyDeviceToDevice: ("device", "device"),
        }[kind]
        for side, ptr in zip(want, (src, dst)):
            where = self.owner(ptr, nbytes)
            assert (where == "device") == (side == "device"), (
                f"{kind.name}: a {where} address where {side} is due"
            )
            if where == "pageable":
                self.traffic["pageable"] += nbytes
        ctypes.memmove(dst, src, nbytes)
        self.traffic[kind.name] += nbytes
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpy2DAsync(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: Any, stream: Any
    ) -> tuple[Any]:
        assert kind == self.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for r in range(height):
            assert (
                self.owner(dst + r * dpitch, width) == "device"
                and self.owner(src + r * spitch, width) == "device"
            )
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        self.traffic[kind.name] += width * height
        return (self.cudaError_t.cudaSuccess,)


def read_at(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_char * max(n, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype, count=int(np.prod(shape, dtype=np.int64))).reshape(shape).copy()


def make_tensorrt(version: str, cuda: FakeCuda) -> types.ModuleType:
    """A `tensorrt` module of one API generation whose engines run the ONNX graph in ONNX Runtime."""
    import onnxruntime as ort

    from mmedge.runtime.trt_plan import shape_tensor_inputs

    members = MEMBERS[version]
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec() sees it installed
    trt.__version__ = {"10.3": "10.3.0.26", "11.1": "11.1.0.106"}[version]
    for name in (
        "BuilderFlag",
        "NetworkDefinitionCreationFlag",
        "MemoryPoolType",
        "TensorIOMode",
        "DataType",
    ):
        setattr(trt, name, _enum(version, name))
    if "HardwareCompatibilityLevel" in members:
        trt.HardwareCompatibilityLevel = _enum(version, "HardwareCompatibilityLevel")
    np_of = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}
    trt.nptype = lambda dt: np_of[dt.name]
    dtype_of = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 9: "BOOL"}

    def strict(api: str) -> type:
        return type(api, (_Strict,), {"_api": api, "_version": version})

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self) -> None:
            pass

    class Tensor(strict("ITensor")):
        def __init__(self, name: str, shape: list[int], is_shape: bool):
            self._name, self._shape, self._is_shape = name, shape, is_shape

        name = property(lambda self: self._name)
        shape = property(lambda self: self._shape)
        is_shape_tensor = property(lambda self: self._is_shape)

    class Network(strict("INetworkDefinition")):
        def __init__(self, flags: int):
            self._flags, self._inputs, self._onnx = flags, [], b""

        num_inputs = property(lambda self: len(self._inputs))

        def get_input(self, i: int) -> Tensor:
            return self._inputs[i]

    class OnnxParser(strict("OnnxParser")):
        def __init__(self, network: Network, logger: Any):
            self._network, self._errors = network, []

        def parse(self, model: bytes, path: str | None = None) -> bool:
            m = onnx.load_from_string(bytes(model))
            shapes = set(shape_tensor_inputs(m))
            for v in m.graph.input:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                self._network._inputs.append(Tensor(v.name, dims, v.name in shapes))
            self._errors = [
                f"node {n.name} ({n.op_type}): UNSUPPORTED_NODE"
                for n in m.graph.node
                if n.op_type == "Bernoulli"
            ]
            self._network._onnx = bytes(model)
            return not self._errors

        def parse_from_file(self, path: str) -> bool:
            return self.parse(onnx.load(path).SerializeToString())

        num_errors = property(lambda self: len(self._errors))

        def get_error(self, i: int) -> str:
            return self._errors[i]

    class Profile(strict("IOptimizationProfile")):
        def __init__(self) -> None:
            self._shapes, self._values = {}, {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self._shapes[name] = [list(lo), list(opt), list(hi)]

        def set_shape_input(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self._values[name] = [list(lo), list(opt), list(hi)]

    class TimingCache(strict("ITimingCache")):
        def __init__(self, data: bytes):
            self._data = data

        def serialize(self) -> bytes:
            return self._data + b"+tuned"

    class Config(strict("IBuilderConfig")):
        def __init__(self) -> None:
            self._flags, self._profiles, self._pool, self._cache = set(), [], {}, None
            self._hw = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self._pool[pool.name] = size

        def set_flag(self, flag: Any) -> None:
            self._flags.add(flag.name)

        def add_optimization_profile(self, profile: Profile) -> int:
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self._cache = cache
            return cache._data != b"other-gpu"

        def get_timing_cache(self) -> TimingCache:
            return self._cache

        hardware_compatibility_level = property(
            lambda self: self._hw, lambda self, v: object.__setattr__(self, "_hw", v.name)
        )

    class Builder(strict("Builder")):
        last: Any = None

        def __init__(self, logger: Any):
            pass

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            Builder.last = (network, config)
            flags = [f.name for f in trt.NetworkDefinitionCreationFlag if network._flags >> int(f) & 1]
            profile = config._profiles[0] if config._profiles else Profile()
            head = {
                "network_flags": flags,
                "builder_flags": sorted(config._flags),
                "hardware": config._hw,
                "shapes": profile._shapes,
                "values": profile._values,
            }
            return memoryview(_MAGIC + json.dumps(head).encode() + b"\n" + network._onnx)

    class Engine(strict("ICudaEngine")):
        def __init__(self, head: dict, model: bytes):
            self._head = head
            self._sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            m = onnx.load_from_string(model)
            self._io = {}
            for v, mode in [(v, "INPUT") for v in m.graph.input] + [(v, "OUTPUT") for v in m.graph.output]:
                tt = v.type.tensor_type
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
                self._io[v.name] = (mode, dims, getattr(trt.DataType, dtype_of[tt.elem_type]))
            self._shape_io = set(head["values"])

        num_io_tensors = property(lambda self: len(self._io))

        def get_tensor_name(self, i: int) -> str:
            return list(self._io)[i]

        def get_tensor_mode(self, name: str) -> Any:
            return getattr(trt.TensorIOMode, self._io[name][0])

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._io[name][1]

        def get_tensor_dtype(self, name: str) -> Any:
            return self._io[name][2]

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[list[int]]:
            return self._head["shapes"][name]

        def is_shape_inference_io(self, name: str) -> bool:
            return name in self._shape_io

        def create_execution_context(self) -> Context:
            return Context(self)

    class Context(strict("IExecutionContext")):
        def __init__(self, engine: Engine):
            self._engine, self._shapes, self._addr, self._results = engine, {}, {}, None

        def set_input_shape(self, name: str, shape: Any) -> bool:
            lo, _, hi = self._engine._head["shapes"][name]
            shape = tuple(int(d) for d in shape)
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                return False
            self._shapes[name], self._results = shape, None
            return True

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self._addr[name] = int(ptr)
            return True

        def _run(self) -> dict[str, np.ndarray]:
            if self._results is None:
                feeds = {}
                for name, (mode, _, dt) in self._engine._io.items():
                    if mode != "INPUT":
                        continue
                    shape, ptr = self._shapes[name], self._addr[name]
                    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(trt.nptype(dt)).itemsize
                    where = cuda.owner(ptr, nbytes)
                    host = self._engine.is_shape_inference_io(name)
                    assert (where != "device") == host, f"input {name!r} at a {where} address"
                    feeds[name] = read_at(ptr, shape, trt.nptype(dt))
                out = self._engine._sess.run(None, feeds)
                names = [o.name for o in self._engine._sess.get_outputs()]
                self._results = dict(zip(names, out))
            return self._results

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self._shapes:
                return self._shapes[name]
            return tuple(self._run()[name].shape)

        def execute_async_v3(self, stream: int) -> bool:
            for name, arr in self._run().items():
                arr = np.ascontiguousarray(arr)
                assert cuda.owner(self._addr[name], arr.nbytes) == "device", (
                    f"output {name!r} not on the device"
                )
                ctypes.memmove(self._addr[name], arr.ctypes.data, arr.nbytes)
            self._results = None
            return True

    class Runtime(strict("Runtime")):
        def __init__(self, logger: Any):
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            data = bytes(data)
            if not data.startswith(_MAGIC):
                return None
            head, model = data[len(_MAGIC) :].split(b"\n", 1)
            return Engine(json.loads(head), model)

    trt.ILogger, trt.Builder, trt.OnnxParser, trt.Runtime = ILogger, Builder, OnnxParser, Runtime
    return trt


def install(monkeypatch: Any, version: str) -> tuple[types.ModuleType, FakeCuda]:
    """Put the fakes where `import tensorrt` and `cuda.bindings.runtime` find them."""
    import mmedge.runtime.backends.tensorrt as trtb

    cuda = FakeCuda()
    trt = make_tensorrt(version, cuda)
    for name, mod in {
        "tensorrt": trt,
        "cuda": types.ModuleType("cuda"),
        "cuda.bindings": types.ModuleType("cuda.bindings"),
        "cuda.bindings.runtime": cuda,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    trtb._logger.cache_clear()
    return trt, cuda
