"""TensorRT backend: import and errors without TensorRT, build logic against a stand-in, real runs on a GPU.

The stand-in `tensorrt` / `cuda` modules only mimic the documented TensorRT 10 calls that
`build_engine` makes, so the build logic (profiles, flags, timing cache, atomic writes, errors)
is exercised on machines without a GPU. The `trt`-marked tests run the real library.
"""

from __future__ import annotations

import enum
import hashlib
import re
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mmedge.builds.tensorrt as trtbuild
import mmedge.runtime.backends.tensorrt as trtb
from mmedge.errors import IntegrityError, InvalidInputError, MissingDependencyError, UnsupportedError
from mmedge.runtime.backends.base import SessionOptions

DIMS = {"x": ((1, 4), (2, 4), (8, 4))}


def _onnx(path, bad: bool = False) -> str:
    """y = relu(x @ w + b) with a dynamic batch; `bad` adds an op TensorRT refuses."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5, "w")
    b = numpy_helper.from_array(np.array([0.1, -0.2, 0.3], np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Bernoulli" if bad else "Relu", ["a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w, b],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def _reference(path, x: np.ndarray) -> np.ndarray:
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return np.maximum(x @ init["w"] + init["b"], 0)


# --- without TensorRT -------------------------------------------------------------------


def test_module_imports_without_tensorrt_cuda_or_torch():
    code = (
        "import sys\n"
        "for m in ('tensorrt', 'cuda', 'torch'): sys.modules[m] = None\n"
        "import mmedge.builds.tensorrt as b\n"
        "import mmedge.runtime.backends.tensorrt as t\n"
        "assert t.TensorRTSession and b.build_engine\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_build_engine_without_tensorrt_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, even where it is
    with pytest.raises(MissingDependencyError, match=r"mmedge\[trt\]"):
        trtbuild.build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan", DIMS, "fp16")
    with pytest.raises(MissingDependencyError, match=r"mmedge\[trt\]"):
        trtbuild.engine_target({"workspace": 1})


def test_session_refuses_bytes_with_another_hash_before_tensorrt_sees_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(IntegrityError, match="only engines built by mmedge"):
        trtb.TensorRTSession(b"not an engine", hashlib.sha256(b"another").hexdigest())


@pytest.mark.parametrize(
    ("dims", "precision"),
    [({"x": ((1, 4), (2, 4))}, "fp16"), ({"x": ((4, 4), (2, 4), (8, 4))}, "fp16"), (DIMS, "int4")],
)
def test_bad_dims_and_precision_are_refused_up_front(tmp_path, dims, precision):
    with pytest.raises(InvalidInputError):
        trtbuild.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", dims, precision)


# --- build logic against a stand-in of the documented API ---------------------------------


class _Err(enum.Enum):
    cudaSuccess = 0


class _Network:
    def __init__(self):
        self.inputs = []
        self.num_inputs = 0

    def get_input(self, i):
        return self.inputs[i]


class _Parser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        graph = onnx.load(path).graph
        for v in graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            self.network.inputs.append(types.SimpleNamespace(name=v.name, shape=dims))
        self.network.num_inputs = len(graph.input)
        self.errors = [
            f"node {n.name or i} ({n.op_type}): UNSUPPORTED_NODE"
            for i, n in enumerate(graph.node)
            if n.op_type == "Bernoulli"
        ]
        return not self.errors

    def parse(self, model):  # the documented `parse(model: buffer, path=None)`
        import tempfile

        with tempfile.TemporaryDirectory() as d:  # the stand-in reads through onnx.load
            (Path(d) / "m.onnx").write_bytes(bytes(model))
            return self.parse_from_file(str(Path(d) / "m.onnx"))

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class _Cache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return self.data + b"+tuned"


class _Config:
    def __init__(self):
        self.flags, self.profiles, self.pool, self.cache = set(), [], {}, None

    def set_memory_pool_limit(self, pool, size):
        self.pool[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        return _Cache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return cache.data != b"other-gpu"

    def get_timing_cache(self):
        return self.cache


class _Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        assert flags == 0
        return _Network()

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return types.SimpleNamespace(shapes={}, set_shape=lambda n, lo, opt, hi: None)

    def build_serialized_network(self, network, config):
        _Builder.last = (network, config)
        return memoryview(b"PLAN:" + ",".join(sorted(config.flags)).encode())


class _ILogger:
    Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

    def __init__(self):
        pass


@pytest.fixture
def fake_trt(monkeypatch):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0.26"
    trt.ILogger, trt.Builder, trt.OnnxParser = _ILogger, _Builder, _Parser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    runtime = types.ModuleType("cuda.bindings.runtime")
    runtime.cudaGetDevice = lambda: (_Err.cudaSuccess, 0)
    runtime.cudaDeviceAttr = types.SimpleNamespace(
        cudaDevAttrComputeCapabilityMajor="major", cudaDevAttrComputeCapabilityMinor="minor"
    )
    runtime.cudaDeviceGetAttribute = lambda attr, dev: (_Err.cudaSuccess, {"major": 8, "minor": 7}[attr])
    runtime.cudaGetDeviceProperties = lambda dev: (
        _Err.cudaSuccess,
        types.SimpleNamespace(name=b"Orin (nvgpu)" + b"\0" * 244),
    )
    for name, mod in {
        "tensorrt": trt,
        "cuda": types.ModuleType("cuda"),
        "cuda.bindings": types.ModuleType("cuda.bindings"),
        "cuda.bindings.runtime": runtime,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    trtb._logger.cache_clear()
    yield trt
    trtb._logger.cache_clear()


def test_build_writes_plan_atomically_and_records_settings(tmp_path, fake_trt):
    onnx_path, out, cache = (
        _onnx(tmp_path / "m.onnx"),
        tmp_path / "engines" / "m.fp16.plan",
        tmp_path / "tc.bin",
    )
    record = trtbuild.build_engine(onnx_path, out, DIMS, "fp16", cache, workspace_bytes=1 << 20)
    assert out.read_bytes() == b"PLAN:FP16"
    assert record["sha256"] == hashlib.sha256(b"PLAN:FP16").hexdigest() and record["size"] == 9
    assert (record["backend"], record["version"], record["device"]) == ("tensorrt", "10.3.0.26", "8.7")
    assert record["dims"] == {"x": [[1, 4], [2, 4], [8, 4]]} and record["precision"] == "fp16"
    assert record["onnx_sha256"] == hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
    _, config = _Builder.last
    assert config.pool == {"workspace": 1 << 20} and len(config.profiles) == 1
    assert cache.read_bytes() == b"+tuned"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.fp16.plan"]  # no temp files left


def test_build_int8_sets_int8_and_reuses_or_replaces_the_timing_cache(tmp_path, fake_trt):
    cache = tmp_path / "tc.bin"
    cache.write_bytes(b"old")
    trtbuild.build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "a.plan", DIMS, "int8", cache)
    assert (tmp_path / "a.plan").read_bytes() == b"PLAN:INT8" and cache.read_bytes() == b"old+tuned"
    cache.write_bytes(b"other-gpu")
    trtbuild.build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "b.plan", DIMS, "fp32", cache)
    assert (tmp_path / "b.plan").read_bytes() == b"PLAN:" and cache.read_bytes() == b"+tuned"


def test_build_errors_name_what_is_wrong(tmp_path, fake_trt):
    good = _onnx(tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError, match=r"(?s)cannot parse bad.onnx.*Bernoulli"):
        trtbuild.build_engine(_onnx(tmp_path / "bad.onnx", bad=True), tmp_path / "m.plan", DIMS, "fp32")
    with pytest.raises(InvalidInputError, match="dynamic shapes"):
        trtbuild.build_engine(good, tmp_path / "m.plan", {}, "fp32")
    with pytest.raises(InvalidInputError, match="not inputs"):
        trtbuild.build_engine(good, tmp_path / "m.plan", {**DIMS, "pixel_values": ((1,), (1,), (1,))}, "fp32")
    with pytest.raises(InvalidInputError, match="does not fit"):
        trtbuild.build_engine(good, tmp_path / "m.plan", {"x": ((1, 2), (2, 2), (8, 2))}, "fp32")
    with pytest.raises(InvalidInputError, match="does not exist"):
        trtbuild.build_engine(tmp_path / "missing.onnx", tmp_path / "m.plan", DIMS, "fp32")
    assert not (tmp_path / "m.plan").exists()


def test_engine_target_names_gpu_tensorrt_and_settings(fake_trt):
    a, b = (
        trtbuild.engine_target({"workspace": 1, "opt": 3}),
        trtbuild.engine_target({"opt": 3, "workspace": 1}),
    )
    assert re.fullmatch(r"sm87-trt10\.3-[0-9a-f]{8}", a) and a == b
    assert trtbuild.engine_target({"workspace": 2}) != a
    with pytest.raises(InvalidInputError):
        trtbuild.engine_target({"path": object()})


def test_build_from_bytes_needs_no_file_and_refuses_unknown_settings(tmp_path, fake_trt):
    model = Path(_onnx(tmp_path / "m.onnx")).read_bytes()
    (tmp_path / "m.onnx").unlink()
    plan = trtbuild.build_engine_bytes(
        model, precision="fp16", settings={"workspace_bytes": 1 << 20}, profile=DIMS
    )
    assert plan == b"PLAN:FP16"
    _, config = _Builder.last
    assert config.pool == {"workspace": 1 << 20} and len(config.profiles) == 1 and config.cache is None
    assert trtbuild.device_builder(model, precision="int4", settings={}, profile=DIMS) == b"PLAN:"
    assert trtbuild.device_builder(model, precision="int8", settings={}, profile=DIMS) == b"PLAN:INT8"
    with pytest.raises(UnsupportedError, match=r"\['opt_level'\] are not known"):
        trtbuild.build_engine_bytes(model, precision="fp16", settings={"opt_level": 3}, profile=DIMS)
    with pytest.raises(InvalidInputError, match="workspace_bytes"):
        trtbuild.build_engine_bytes(model, precision="fp16", settings={"workspace_bytes": -1}, profile=DIMS)


def test_current_device_names_tensorrt_and_the_gpu(fake_trt):
    device = trtb.current_device()
    assert (device.tensorrt, device.compute_capability, device.name) == ("10.3.0.26", "8.7", "Orin (nvgpu)")


# --- real TensorRT on a GPU ------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu():
    pytest.importorskip("tensorrt")
    try:
        return trtb.compute_capability()
    except Exception as exc:
        pytest.skip(f"no usable CUDA GPU: {exc}")


@pytest.mark.trt
def test_real_build_and_run_fp32_matches_numpy(tmp_path, gpu):
    onnx_path = _onnx(tmp_path / "m.onnx")
    record = trtbuild.build_engine(onnx_path, tmp_path / "m.plan", DIMS, "fp32", tmp_path / "tc.bin")
    assert record["device"] == gpu and (tmp_path / "tc.bin").stat().st_size > 0
    session = trtb.TensorRTSession((tmp_path / "m.plan").read_bytes(), record["sha256"])
    assert session.input_names == ("x",) and session.output_names == ("y",)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(session.run({"x": x})["y"], _reference(onnx_path, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="outside the engine's profile"):
        session.run({"x": np.zeros((9, 4), np.float32)})
    with pytest.raises(InvalidInputError, match="float64"):
        session.run({"x": x.astype(np.float64)})
    tampered = bytearray((tmp_path / "m.plan").read_bytes())
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError):
        trtb.TensorRTSession(bytes(tampered), record["sha256"])


@pytest.mark.trt
def test_real_fp16_session_is_thread_safe(tmp_path, gpu):
    onnx_path = _onnx(tmp_path / "m.onnx")
    record = trtbuild.build_engine(onnx_path, tmp_path / "m.plan", DIMS, "fp16")
    session = trtb.TensorRTSession((tmp_path / "m.plan").read_bytes(), record["sha256"])
    failures = []

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(20):
            x = rng.standard_normal((int(rng.integers(1, 9)), 4)).astype(np.float32)
            got = session.run({"x": x})["y"]
            if not np.allclose(got, _reference(onnx_path, x), rtol=1e-2, atol=1e-2):
                failures.append(seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert failures == []
    assert re.fullmatch(r"sm\d+-trt\d+\.\d+-[0-9a-f]{8}", trtbuild.engine_target({"precision": "fp16"}))


def test_backend_refuses_engines_of_another_tensorrt_or_gpu(fake_trt):
    from mmedge.runtime.manifest import EngineEntry

    other = EngineEntry("tensorrt", "10.0.1.6", "8.7", {}, {"vision.fp16": "engines/x/vision.fp16.plan"})
    package = types.SimpleNamespace(
        manifest=types.SimpleNamespace(engines={"sm87-trt10.0-aaaaaaaa": other}, bundle=None)
    )
    with pytest.raises(
        UnsupportedError, match=r"TensorRT 10\.3\.0\.26 for compute capability 8\.7.*10\.0\.1\.6"
    ):
        trtb.TensorRTBackend().load(package, "vision", "fp16", SessionOptions())
