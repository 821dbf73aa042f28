"""The on-device TensorRT engine cache: keying, invalidation, crash safety, concurrency, and the
TensorRT backend building a "tensorrt" bundle's engines through it.

A fake builder and a fake device identity stand in for TensorRT and the GPU, so everything but the
last (`trt`-marked) test runs anywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import textwrap
import threading
import time
import types
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mmedge.runtime.backends.tensorrt as trtb
from mmedge.errors import IntegrityError, MissingDependencyError, UnsupportedError
from mmedge.runtime.backends.base import SessionOptions
from mmedge.runtime.engine_cache import (
    CACHE_DIR,
    DeviceIdentity,
    EngineCache,
    EngineSpec,
    cache_dir,
    clear_engines,
    engine_key,
    list_engines,
)
from mmedge.runtime.manifest import ComponentEntry, DimRange, FileEntry, PrecisionEntry, TensorSpec
from mmedge.runtime.sections import BundleConfig
from mmedge.runtime.trt_plan import EngineSource

ORIN = DeviceIdentity(tensorrt="10.3.0.26", compute_capability="8.7", name="Orin", platform="linux-aarch64")
SOURCE = EngineSource("vision", "int8", {"x": [[1, 4], [2, 4], [8, 4]]}, {})
SPEC = EngineSpec(
    onnx_sha256="a" * 64,
    source=SOURCE,
    settings={"workspace_bytes": 1 << 20},
    label="tiny/vision.int8",
)


class FakeBuilder:
    """Records its calls; the plan names what it was built from, so a stale one is recognisable."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[dict] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, model, source, settings):
        precision, profile = source.precision, source.profile
        with self._lock:
            self.calls.append(
                {"model": model, "precision": precision, "settings": settings, "profile": profile}
            )
        time.sleep(self.delay)
        blob = json.dumps([hashlib.sha256(model).hexdigest(), precision, settings, profile], sort_keys=True)
        return b"PLAN:" + blob.encode()


@pytest.fixture
def cache(store):
    return EngineCache(builder=FakeBuilder())


def _get(cache, spec=SPEC, device=ORIN, model=b"onnx-bytes"):
    return cache.get(spec, device, lambda: model)


# --- keying ----------------------------------------------------------------------------------


def test_same_inputs_hit_without_rebuilding(cache, store):
    first = _get(cache)
    second = _get(cache)
    assert first.built and not second.built
    assert first.data == second.data and first.sha256 == hashlib.sha256(first.data).hexdigest()
    assert len(cache._builder.calls) == 1
    assert cache.root == store / CACHE_DIR == cache_dir()
    assert sorted(p.name for p in cache.root.iterdir()) == sorted(
        f"{first.key}{ext}" for ext in (".plan", ".json", ".lock")
    )
    assert EngineCache(builder=FakeBuilder()).get(SPEC, ORIN, lambda: b"").built is False  # another instance


def test_the_key_ignores_spelling_and_label_but_not_content():
    same = replace(
        SPEC, settings={"workspace_bytes": 1 << 20, "version_compatible": False}, label="other/vision.int8"
    )
    assert engine_key(same, ORIN) == engine_key(SPEC, ORIN)  # a default spelled out is the same build


@pytest.mark.parametrize(
    ("spec", "device"),
    [
        (replace(SPEC, onnx_sha256="b" * 64), ORIN),  # the ONNX changed
        (SPEC, replace(ORIN, tensorrt="10.4.0.0")),  # TensorRT upgraded
        (SPEC, replace(ORIN, compute_capability="8.6")),  # another GPU architecture
        (SPEC, replace(ORIN, name="Orin Nano")),  # another GPU of the same architecture
        (SPEC, replace(ORIN, platform="linux-x86_64")),  # a server with the same GPU architecture
        (replace(SPEC, settings={"workspace_bytes": 1 << 21}), ORIN),
        (replace(SPEC, settings={"workspace_bytes": 1 << 20, "version_compatible": True}), ORIN),
        (replace(SPEC, source=replace(SOURCE, profile={"x": [[1, 4], [4, 4], [8, 4]]})), ORIN),
        (replace(SPEC, source=replace(SOURCE, precision="fp16")), ORIN),
        (replace(SPEC, source=replace(SOURCE, value_ranges={"k": [1, 64]})), ORIN),
        (replace(SPEC, external_data={"w.data": "c" * 64}), ORIN),
    ],
    ids=[
        "onnx",
        "tensorrt",
        "compute-capability",
        "gpu-name",
        "platform",
        "settings",
        "version-compatible",
        "profile",
        "precision",
        "shape-values",
        "external-data",
    ],
)
def test_any_change_is_a_new_key_and_a_rebuild(cache, spec, device):
    old = _get(cache)
    new = _get(
        cache, spec, device, model=b"other-onnx" if spec.onnx_sha256 != SPEC.onnx_sha256 else b"onnx-bytes"
    )
    assert new.built and new.key != old.key and len(cache._builder.calls) == 2
    assert _get(cache).key == old.key and not _get(cache).built  # the old entry is still there, untouched
    assert len(cache.entries()) == 2


# --- crash safety ----------------------------------------------------------------------------


def test_temp_files_of_a_killed_build_are_ignored_and_removed(cache):
    key = engine_key(SPEC, ORIN)
    cache.root.mkdir(parents=True)
    leftovers = [cache.root / f".{key}.plan.deadbeef.tmp", cache.root / f".{key}.json.cafe0000.tmp"]
    for tmp in leftovers:
        tmp.write_bytes(b"half an engine")
    got = _get(cache)
    assert got.built and got.data.startswith(b"PLAN:")
    assert not any(t.exists() for t in leftovers)


@pytest.mark.parametrize("damage", ["truncate", "flip", "grow", "replace"])
def test_a_torn_or_altered_plan_is_rebuilt_never_returned(cache, damage):
    good = _get(cache)
    plan = cache.plan_path(good.key)
    data = plan.read_bytes()
    plan.write_bytes(
        {
            "truncate": data[: len(data) // 2],
            "flip": data[:-1] + bytes([data[-1] ^ 1]),
            "grow": data + b"\0",
            "replace": b"X" * len(data),
        }[damage]
    )
    again = _get(cache)
    assert again.built and again.data == good.data and len(cache._builder.calls) == 2
    assert plan.read_bytes() == good.data and not _get(cache).built


def test_meta_without_plan_and_plan_without_meta_are_rebuilt(cache):
    good = _get(cache)
    cache.plan_path(good.key).unlink()  # killed after the meta of an old entry was kept (or plan deleted)
    assert _get(cache).built
    cache.meta_path(good.key).unlink()  # killed between the plan's rename and the meta's
    assert _get(cache).built
    assert len(cache._builder.calls) == 3 and not _get(cache).built


def test_a_meta_not_written_here_is_not_trusted(cache, store):
    """Whoever can write the cache can re-hash a plan into its meta, but cannot forge the MAC."""
    good = _get(cache)
    meta_path, plan = cache.meta_path(good.key), cache.plan_path(good.key)
    evil = b"PLAN:evil"
    meta = json.loads(meta_path.read_text())
    meta.update(size=len(evil), sha256=hashlib.sha256(evil).hexdigest())
    plan.write_bytes(evil)
    meta_path.write_text(json.dumps(meta))
    got = _get(cache)
    assert got.built and got.data == good.data
    for bad in (b"{not json", b"[]", json.dumps({**meta, "mac": "0" * 64}).encode()):
        meta_path.write_bytes(bad)
        assert _get(cache).built
    (store / ".local-key").unlink()  # another installation: its entries do not check under a new key
    assert _get(cache).built


def test_an_unwritable_store_builds_every_time_and_keeps_nothing(cache, monkeypatch):
    import mmedge.runtime.local_key as lk

    monkeypatch.setattr(lk, "local_key", lambda create=False: None)
    assert _get(cache).built and _get(cache).built
    assert not list(cache.root.glob("*.plan"))


def test_the_onnx_is_read_only_on_a_miss(cache):
    reads = []
    cache.get(SPEC, ORIN, lambda: reads.append(1) or b"m")
    cache.get(SPEC, ORIN, lambda: reads.append(1) or b"m")
    assert reads == [1]


# --- concurrency -----------------------------------------------------------------------------


def test_threads_asking_for_one_key_build_it_once(store):
    cache = EngineCache(builder=FakeBuilder(delay=0.2))
    results, errors = [], []

    def use():
        try:
            results.append(_get(cache))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and len(cache._builder.calls) == 1
    assert len({r.data for r in results}) == 1 and sum(r.built for r in results) == 1
    assert [e.valid for e in cache.entries()] == [True]


_CHILD = textwrap.dedent(
    """
    import hashlib, sys, time
    from mmedge.runtime.engine_cache import DeviceIdentity, EngineCache, EngineSpec
    from mmedge.runtime.trt_plan import EngineSource

    def builder(model, source, settings):
        with open(sys.argv[1], "a") as f:
            f.write("built\\n")
        time.sleep(0.5)
        return b"PLAN:" + hashlib.sha256(model).digest()

    spec = EngineSpec("a" * 64, EngineSource("v", "int8", {"x": [[1, 4], [2, 4], [8, 4]]}, {}), {"workspace_bytes": 1})
    device = DeviceIdentity("10.3.0.26", "8.7", "Orin", "linux-aarch64")
    got = EngineCache(builder=builder).get(spec, device, lambda: b"m")
    print(got.sha256)
    """
)


def test_two_processes_first_using_one_engine_end_with_one_valid_entry(store, tmp_path):
    log = tmp_path / "builds.log"
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(log)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == hashlib.sha256(b"PLAN:" + hashlib.sha256(b"m").digest()).hexdigest()
    assert log.read_text() == "built\n"  # the second waited for the first and found its entry
    assert [e.valid for e in list_engines()] == [True]


# --- listing and clearing --------------------------------------------------------------------


def test_list_and_clear(cache, store):
    from mmedge.runtime.store import list_packages

    assert list_engines() == [] and clear_engines() == 0
    a = _get(cache)
    _get(cache, replace(SPEC, source=replace(SOURCE, precision="fp16"), label="tiny/vision.fp16"))
    listed = list_engines()
    assert [e.label for e in listed] == ["tiny/vision.fp16", "tiny/vision.int8"]
    assert all(e.valid and e.tensorrt == "10.3.0.26" and e.device_name == "Orin" for e in listed)
    assert next(e for e in listed if e.key == a.key).size == len(a.data)
    cache.plan_path(a.key).write_bytes(b"torn")
    assert [e.valid for e in list_engines()] == [True, False]
    assert list_packages() == []  # the cache is not a package
    assert clear_engines() == 2 and list(cache.root.iterdir()) == [] and list_engines() == []
    assert _get(cache).built


# --- the TensorRT backend on a "tensorrt" bundle ----------------------------------------------


def _bundle(tmp_path, target="tensorrt", settings=None, engines=None, weight=1.0, external=False):
    """A verified-package stand-in: a real ONNX file (weights inline or in `vision.int8.onnx.data`),
    its manifest entries and a bundle section."""
    w = numpy_helper.from_array(np.full((4, 3), weight, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rel = "onnx/vision.int8.onnx"
    (tmp_path / "onnx").mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(
            model,
            str(tmp_path / rel),
            save_as_external_data=True,
            location="vision.int8.onnx.data",
            size_threshold=0,
        )
    else:
        onnx.save(model, str(tmp_path / rel))
    data = (tmp_path / rel).read_bytes()
    files = {}
    for path in sorted((tmp_path / "onnx").iterdir()):
        blob = path.read_bytes()
        files[f"onnx/{path.name}"] = FileEntry(hashlib.sha256(blob).hexdigest(), len(blob))
    entry = ComponentEntry(
        role="image_encoder",
        inputs=(TensorSpec("x", "float32", ("batch", 4)),),
        outputs=(TensorSpec("y", "float32", ("batch", 3)),),
        dims={"batch": DimRange(1, 2, 8)},
        precisions={"int8": PrecisionEntry(rel)},
    )
    manifest = types.SimpleNamespace(
        name="tiny",
        files=files,
        components={"vision": entry},
        component=lambda name: entry,
        engines=engines or {},
        bundle=BundleConfig(target, "int8", settings=settings or {"workspace_bytes": 1 << 20}),
    )
    return types.SimpleNamespace(root=tmp_path, manifest=manifest), data


class _Session:
    def __init__(self, engine_bytes, expected_sha256, host_code=False):
        assert hashlib.sha256(engine_bytes).hexdigest() == expected_sha256
        self.engine = engine_bytes


@pytest.fixture
def device(monkeypatch):
    """A GPU as far as the cache is concerned: sessions and the check of a new engine against its
    source graph are stubs here (tests/runtime/test_tensorrt_package.py runs both on the fakes)."""
    monkeypatch.setattr(trtb, "current_device", lambda: ORIN)
    monkeypatch.setattr(trtb, "TensorRTSession", _Session)
    monkeypatch.setattr(trtb, "engine_error_vs", lambda *args: 0.0)


def test_a_tensorrt_bundle_builds_its_engine_on_first_load_and_reuses_it(tmp_path, store, device):
    package, data = _bundle(tmp_path / "pkg")
    builder = FakeBuilder()
    backend = trtb.TensorRTBackend(EngineCache(builder=builder))
    first = backend.load(package, "vision", "int8", SessionOptions())
    again = trtb.TensorRTBackend(EngineCache(builder=builder)).load(
        package, "vision", "int8", SessionOptions()
    )
    assert first.engine == again.engine and len(builder.calls) == 1
    call = builder.calls[0]
    assert onnx.load_from_string(call["model"]) == onnx.load_from_string(data)  # the verified bytes
    assert call["precision"] == "int8" and call["settings"]["workspace_bytes"] == 1 << 20
    assert call["profile"] == {"x": [[1, 4], [2, 4], [8, 4]]}  # from the manifest's dim ranges
    (entry,) = list_engines()
    assert entry.label == "tiny/vision.int8" and entry.device_name == "Orin"
    other, _ = _bundle(tmp_path / "pkg2", settings={"workspace_bytes": 1 << 21})
    backend.load(other, "vision", "int8", SessionOptions())
    assert len(builder.calls) == 2 and len(list_engines()) == 2  # other settings, another engine


def test_external_weights_are_part_of_the_key(tmp_path, store, device):
    """With external data the graph file is the same bytes whatever the weights."""
    builder = FakeBuilder()
    backend = trtb.TensorRTBackend(EngineCache(builder=builder))
    a, graph_a = _bundle(tmp_path / "a", external=True, weight=1.0)
    b, graph_b = _bundle(tmp_path / "b", external=True, weight=2.0)
    assert graph_a == graph_b
    ea = backend.load(a, "vision", "int8", SessionOptions()).engine
    eb = backend.load(b, "vision", "int8", SessionOptions()).engine
    assert len(builder.calls) == 2 and ea != eb
    weights = [
        numpy_helper.to_array(onnx.load_from_string(c["model"]).graph.initializer[0]) for c in builder.calls
    ]
    assert [float(w[0, 0]) for w in weights] == [1.0, 2.0]  # self-contained models from the verified data
    backend.load(b, "vision", "int8", SessionOptions())
    assert len(builder.calls) == 2


def test_the_default_backend_uses_the_store_cache_and_the_tensorrt_builder(
    tmp_path, store, device, monkeypatch
):
    import mmedge.runtime.trt_build as trtbuild

    builder = FakeBuilder()
    monkeypatch.setattr(trtbuild, "device_builder", builder)
    package, _ = _bundle(tmp_path / "pkg")
    trtb.TensorRTBackend().load(package, "vision", "int8", SessionOptions())
    trtb.TensorRTBackend().load(package, "vision", "int8", SessionOptions())
    assert len(builder.calls) == 1 and (store / CACHE_DIR).is_dir()


def test_an_onnx_changed_after_verification_is_refused_before_building(tmp_path, store, device):
    package, data = _bundle(tmp_path / "pkg")
    (tmp_path / "pkg" / "onnx" / "vision.int8.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    builder = FakeBuilder()
    with pytest.raises(IntegrityError, match="sha256 differs from the manifest"):
        trtb.TensorRTBackend(EngineCache(builder=builder)).load(package, "vision", "int8", SessionOptions())
    assert builder.calls == [] and list_engines() == []


def test_only_tensorrt_bundles_are_built_on_the_device(tmp_path, store, device):
    builder = FakeBuilder()
    backend = trtb.TensorRTBackend(EngineCache(builder=builder))
    package, _ = _bundle(tmp_path / "pkg", target="ort-cuda")
    with pytest.raises((UnsupportedError, MissingDependencyError)):
        backend.load(package, "vision", "int8", SessionOptions())
    package, _ = _bundle(tmp_path / "pkg2")
    with pytest.raises(UnsupportedError, match="variant"):
        backend.load(package, "vision", "int8", SessionOptions(), variant="prefill")
    with pytest.raises(UnsupportedError, match="no 'fp16' build"):
        backend.load(package, "vision", "fp16", SessionOptions())
    assert builder.calls == []


# --- real TensorRT on a GPU ------------------------------------------------------------------


@pytest.mark.trt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT and a GPU")
def test_real_bundle_engine_is_built_on_first_use_and_reused(tiny_pkg, store, monkeypatch):
    try:
        device = trtb.current_device()
    except Exception as exc:
        pytest.skip(f"no usable CUDA GPU: {exc}")
    import mmedge.runtime.trt_build as trtbuild
    from mmedge.runtime.package import Package, verify_package

    verified = verify_package(tiny_pkg)
    package = Package(verified.root, replace(verified.manifest, bundle=BundleConfig("tensorrt", "fp32")))
    builds = []

    def counting(model, source, settings):
        builds.append(1)
        return trtbuild.device_builder(model, source, settings)

    monkeypatch.setattr(trtbuild, "device_builder", counting)
    component = next(n for n, c in package.manifest.components.items() if c.role == "image_encoder")
    first = trtb.TensorRTBackend().load(package, component, "fp32", SessionOptions())
    second = trtb.TensorRTBackend().load(package, component, "fp32", SessionOptions())
    assert builds == [1]
    (entry,) = list_engines()
    assert (
        entry.valid
        and entry.tensorrt == device.tensorrt
        and entry.compute_capability == device.compute_capability
    )
    entry_spec = package.manifest.component(component)
    feeds = {}
    for spec in entry_spec.inputs:
        shape = tuple(entry_spec.dims[d].opt if isinstance(d, str) else d for d in spec.shape)
        feeds[spec.name] = np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)
    out1, out2 = first.run(feeds), second.run(feeds)
    for name in out1:
        np.testing.assert_array_equal(out1[name], out2[name])
