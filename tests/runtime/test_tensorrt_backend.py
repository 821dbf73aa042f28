"""TensorRT backend: import and errors without TensorRT, build logic against a stand-in, real runs on a GPU.

The stand-in `tensorrt` / `cuda` modules (tests/trt_fakes.py) answer only the members of the
TensorRT 10.3 or 11.1 bindings, and every fake-based test runs against both; their engines run the
ONNX graph in ONNX Runtime over fake device memory, so builds, sessions and copies are exercised on
machines without a GPU. The `trt`-marked tests run the real library.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import trt_fakes
from onnx import TensorProto, helper, numpy_helper
from trt_members import MEMBERS

import mmedge.builds.tensorrt as trtbuild
import mmedge.runtime.backends.tensorrt as trtb
from mmedge.errors import (
    BackendError,
    IntegrityError,
    InvalidInputError,
    MissingDependencyError,
    UnsupportedError,
)
from mmedge.runtime import trt_build
from mmedge.runtime.backends.base import SessionOptions
from mmedge.runtime.trt_plan import (
    API_GENERATIONS,
    EnginePlan,
    EngineSource,
    api_generation,
    check_settings,
    plan_engine,
)

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
        trtbuild.build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan", _plan())
    with pytest.raises(MissingDependencyError, match=r"mmedge\[trt\]"):
        trtbuild.engine_target({"workspace": 1})


def test_session_refuses_bytes_with_another_hash_before_tensorrt_sees_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(IntegrityError, match="only engines built by mmedge"):
        trtb.TensorRTSession(b"not an engine", hashlib.sha256(b"another").hexdigest())


def _source(precision: str = "fp32", weight_type: str | None = None) -> EngineSource:
    return EngineSource("m", precision, {"x": [list(s) for s in DIMS["x"]]}, {}, weight_type)


def _model_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return Path(_onnx(Path(d) / "m.onnx")).read_bytes()


def _plan(version: str = "10.3", precision: str = "fp32", **settings) -> EnginePlan:
    model = onnx.load_from_string(_model_bytes())
    return plan_engine(_source(precision), model, settings, API_GENERATIONS[version])


def test_bad_settings_are_refused():
    with pytest.raises(UnsupportedError, match=r"\['opt_level'\] are not known"):
        check_settings({"opt_level": 3})
    for bad in ({"workspace_bytes": -1}, {"workspace_bytes": True}, {"version_compatible": "yes"}):
        with pytest.raises(InvalidInputError):
            check_settings(bad)
    with pytest.raises(InvalidInputError, match="hardware_compatibility"):
        check_settings({"hardware_compatibility": "turing"})


# --- build logic against stand-ins of the 10.3 and 11.1 bindings (tests/trt_fakes.py) ---------


@pytest.fixture(params=["10.3", "11.1"])
def fake_trt(request, monkeypatch):
    trt, _ = trt_fakes.install(monkeypatch, request.param)
    yield trt
    trtb._logger.cache_clear()


def test_the_plan_only_names_members_both_bindings_have():
    for version, api in API_GENERATIONS.items():
        assert api.builder_flags <= set(MEMBERS[version]["BuilderFlag"])
        assert api.strongly_typed_flag == (version == "10.3")  # 11: deprecated, always on
    # the weak-typing flags this module used to set are gone in 11
    assert {"FP16", "INT8"} <= set(MEMBERS["10.3"]["BuilderFlag"])
    assert not {"FP16", "INT8"} & set(MEMBERS["11.1"]["BuilderFlag"])


def test_strict_fakes_fail_on_a_member_one_generation_lacks(monkeypatch):
    trt, _ = trt_fakes.install(monkeypatch, "11.1")
    assert not hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "TF32")
    with pytest.raises(AttributeError, match="has no member 'build_engine'"):
        trt.Builder(None).build_engine  # noqa: B018  (removed in 10; the fake must refuse it)
    trt, _ = trt_fakes.install(monkeypatch, "10.3")
    with pytest.raises(AttributeError, match="has no member 'build_engine_with_config'"):
        trt.Builder(None).build_engine_with_config  # noqa: B018  (11 only)


def test_build_writes_plan_atomically_and_records_it(tmp_path, fake_trt):
    onnx_path, out, cache = (
        _onnx(tmp_path / "m.onnx"),
        tmp_path / "engines" / "m.fp32.plan",
        tmp_path / "tc.bin",
    )
    version = fake_trt.__version__[:4]
    plan = _plan(version, workspace_bytes=1 << 20)
    record = trtbuild.build_engine(onnx_path, out, plan, cache)
    data = out.read_bytes()
    assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["size"] == len(data)
    assert (record["backend"], record["version"], record["device"]) == (
        "tensorrt",
        fake_trt.__version__,
        "8.7",
    )
    assert record["plan"]["profile"] == {"x": [[1, 4], [2, 4], [8, 4]]}
    assert record["onnx_sha256"] == hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
    network, config = fake_trt.Builder.last
    # strongly typed on both: the flag on 10.3 (where it is opt-in), nothing on 11.1; no precision flag
    assert [f.name for f in fake_trt.NetworkDefinitionCreationFlag if network._flags >> int(f) & 1] == (
        ["STRONGLY_TYPED"] if version == "10.3" else []
    )
    assert config._flags == set() and config._pool == {"WORKSPACE": 1 << 20} and len(config._profiles) == 1
    assert cache.read_bytes() == b"+tuned"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.fp32.plan"]  # no temp files left


def test_version_and_hardware_compatible_builds(tmp_path, fake_trt):
    version = fake_trt.__version__[:4]
    plan = _plan(version, version_compatible=True, hardware_compatibility="ampere_plus")
    trtbuild.build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan", plan)
    _, config = fake_trt.Builder.last
    assert config._flags == {"VERSION_COMPATIBLE"} and config._hw == "AMPERE_PLUS"


def test_timing_cache_is_reused_or_replaced(tmp_path, fake_trt):
    cache = tmp_path / "tc.bin"
    cache.write_bytes(b"old")
    plan = _plan(fake_trt.__version__[:4])
    trtbuild.build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "a.plan", plan, cache)
    assert cache.read_bytes() == b"old+tuned"
    cache.write_bytes(b"other-gpu")
    trtbuild.build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "b.plan", plan, cache)
    assert cache.read_bytes() == b"+tuned"


def test_build_errors_name_what_is_wrong(tmp_path, fake_trt):
    version = fake_trt.__version__[:4]
    plan = _plan(version)
    good = _onnx(tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError, match=r"(?s)cannot parse bad.onnx.*Bernoulli"):
        trtbuild.build_engine(_onnx(tmp_path / "bad.onnx", bad=True), tmp_path / "m.plan", plan)
    with pytest.raises(InvalidInputError, match="dynamic shapes"):
        trtbuild.build_engine(good, tmp_path / "m.plan", replace(plan, profile={}))
    extra = replace(plan, profile={**plan.profile, "pixel_values": [[1], [1], [1]]})
    with pytest.raises(InvalidInputError, match="not inputs"):
        trtbuild.build_engine(good, tmp_path / "m.plan", extra)
    narrow = replace(plan, profile={"x": [[1, 2], [2, 2], [8, 2]]})
    with pytest.raises(InvalidInputError, match="does not fit"):
        trtbuild.build_engine(good, tmp_path / "m.plan", narrow)
    with pytest.raises(InvalidInputError, match="does not exist"):
        trtbuild.build_engine(tmp_path / "missing.onnx", tmp_path / "m.plan", plan)
    other = "11.1" if version == "10.3" else "10.3"
    with pytest.raises(UnsupportedError, match=f"plan is for TensorRT {other}"):
        trtbuild.build_engine(good, tmp_path / "m.plan", _plan(other))
    assert not (tmp_path / "m.plan").exists()


def test_unchecked_returns_are_typed_errors(tmp_path, fake_trt, monkeypatch):
    plan, good = _plan(fake_trt.__version__[:4]), _onnx(tmp_path / "m.onnx")
    config_type = type(fake_trt.Builder(None).create_builder_config())
    monkeypatch.setattr(config_type, "add_optimization_profile", lambda self, p: -1)
    with pytest.raises(BackendError, match="add_optimization_profile"):
        trtbuild.build_engine(good, tmp_path / "m.plan", plan)
    monkeypatch.setattr(fake_trt.Builder, "create_builder_config", lambda self: None)
    with pytest.raises(BackendError, match="create_builder_config"):
        trtbuild.build_engine(good, tmp_path / "m.plan", plan)


def test_weight_only_int8_is_skipped_and_int4_planned():
    model = onnx.load_from_string(_model_bytes())
    for api in API_GENERATIONS.values():
        assert (
            "weight-only graph runs on ONNX Runtime"
            in plan_engine(_source("int8", "int8"), model, {}, api).skip
        )
        assert plan_engine(_source("int4", "int4"), model, {}, api).skip == ""
        assert plan_engine(_source("int8"), model, {}, api).skip == ""  # Q/DQ activations: built


def test_engine_target_names_gpu_tensorrt_and_settings(fake_trt):
    a, b = (
        trtbuild.engine_target({"workspace": 1, "opt": 3}),
        trtbuild.engine_target({"opt": 3, "workspace": 1}),
    )
    assert re.fullmatch(r"sm87-trt1[01]\.[13]-[0-9a-f]{8}", a) and a == b
    assert trtbuild.engine_target({"workspace": 2}) != a
    with pytest.raises(InvalidInputError):
        trtbuild.engine_target({"path": object()})


def test_device_builder_plans_from_bytes_alone(fake_trt):
    model = _model_bytes()
    plan = trt_build.device_builder(model, _source(), {"workspace_bytes": 1 << 20})
    assert plan.startswith(b"FAKEPLAN")
    _, config = fake_trt.Builder.last
    assert config._pool == {"WORKSPACE": 1 << 20} and len(config._profiles) == 1 and config._cache is None
    with pytest.raises(UnsupportedError, match="weight-only graph runs on ONNX Runtime"):
        trt_build.device_builder(model, _source("int8", "int8"), {})


def test_current_device_names_tensorrt_the_gpu_and_the_platform(fake_trt):
    device = trtb.current_device()
    assert (device.tensorrt, device.compute_capability, device.name) == (
        fake_trt.__version__,
        "8.7",
        "Orin (nvgpu)",
    )
    assert re.fullmatch(r"[a-z0-9]+-[a-z0-9_]+", device.platform)


def test_session_runs_on_device_buffers_allocated_once(tmp_path, fake_trt):
    cuda = sys.modules["cuda.bindings.runtime"]
    onnx_path = _onnx(tmp_path / "m.onnx")
    trtbuild.build_engine(onnx_path, tmp_path / "m.plan", _plan(fake_trt.__version__[:4]))
    data = (tmp_path / "m.plan").read_bytes()
    session = trtb.TensorRTSession(data, hashlib.sha256(data).hexdigest())
    rng = np.random.default_rng(0)
    for rows in (2, 2, 1, 2):
        x = rng.standard_normal((rows, 4)).astype(np.float32)
        np.testing.assert_allclose(session.run({"x": x})["y"], _reference(onnx_path, x), rtol=1e-5, atol=1e-6)
    out = np.empty((2, 3), np.float32)
    session.run_into({"x": x}, {"y": out})
    np.testing.assert_allclose(out, _reference(onnx_path, x), rtol=1e-5, atol=1e-6)
    assert cuda.calls["cudaMalloc"] == 2 and cuda.calls["cudaFree"] == 0  # one buffer per tensor, reused
    assert cuda.traffic["pageable"] == 0  # every copy goes through pinned staging
    with pytest.raises(InvalidInputError, match="outside the engine's profile"):
        session.run({"x": np.zeros((9, 4), np.float32)})
    with pytest.raises(InvalidInputError, match="float64"):
        session.run({"x": x.astype(np.float64)})
    session.close()
    assert not cuda.device and not cuda.pinned


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
    plan = _plan(api_generation(trtb._trt().__version__).version)
    record = trtbuild.build_engine(onnx_path, tmp_path / "m.plan", plan, tmp_path / "tc.bin")
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
def test_real_session_is_thread_safe(tmp_path, gpu):
    onnx_path = _onnx(tmp_path / "m.onnx")
    plan = _plan(api_generation(trtb._trt().__version__).version)
    record = trtbuild.build_engine(onnx_path, tmp_path / "m.plan", plan)
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
    here = fake_trt.__version__.replace(".", r"\.")
    package = types.SimpleNamespace(
        manifest=types.SimpleNamespace(engines={"sm87-trt10.0-aaaaaaaa": other}, bundle=None)
    )
    with pytest.raises(UnsupportedError, match=rf"TensorRT {here} for compute capability 8\.7.*10\.0\.1\.6"):
        trtb.TensorRTBackend().load(package, "vision", "fp16", SessionOptions())


def test_a_session_without_an_execution_context_is_a_typed_error(tmp_path, fake_trt, monkeypatch):
    trtbuild.build_engine(_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan", _plan(fake_trt.__version__[:4]))
    data = (tmp_path / "m.plan").read_bytes()
    engine_type = type(fake_trt.Runtime(None).deserialize_cuda_engine(data))
    monkeypatch.setattr(engine_type, "create_execution_context", lambda self: None)
    with pytest.raises(BackendError, match="create_execution_context"):
        trtb.TensorRTSession(data, hashlib.sha256(data).hexdigest())
