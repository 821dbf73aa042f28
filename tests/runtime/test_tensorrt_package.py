"""`mmedge build --backend tensorrt` on whole packages and a chat model's decode loop on the engines,
against the stand-ins of the TensorRT 10.3 and 11.1 bindings (tests/trt_fakes.py), whose engines run
the ONNX graphs in ONNX Runtime over fake device memory that counts every copy."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import trt_fakes

from mmedge.errors import UnsupportedError


@pytest.fixture(params=["10.3", "11.1"])
def fake_trt(request, monkeypatch):
    trt, _ = trt_fakes.install(monkeypatch, request.param)
    return trt


def _build_wrong_engines(fake_trt, monkeypatch) -> None:
    """From now on the fake builder doubles a weight of every graph it builds: a wrong engine."""
    import onnx
    from onnx import numpy_helper

    original = fake_trt.Builder.build_serialized_network

    def wrong(self, network, config):
        magic, head, graph = bytes(original(self, network, config)).split(b"\n", 2)
        m = onnx.load_from_string(graph)
        w = next(t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2)
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
        return memoryview(b"\n".join((magic, head, m.SerializeToString())))

    monkeypatch.setattr(fake_trt.Builder, "build_serialized_network", wrong)


def _language_models(tmp_path: Path, package: Path) -> tuple:
    """blip2-tiny's language model on ONNX Runtime and on fp32 engines, and the fake CUDA."""
    from mmedge import sdk
    from mmedge.builds.package import build_package

    pkg = tmp_path / "pkg"
    shutil.copytree(package, pkg)
    build_package(pkg, backend="tensorrt", precision="fp32")
    ref = sdk.Pipeline(str(pkg), backend="ort", precision="fp32").lm
    lm = sdk.Pipeline(str(pkg), backend="tensorrt", precision="fp32").lm
    return ref, lm, sys.modules["cuda.bindings.runtime"]


def _engines(pkg: Path) -> dict[str, str]:
    from mmedge.runtime.package import verify_package

    (entry,) = [e for e in verify_package(pkg).manifest.engines.values() if e.backend == "tensorrt"]
    return dict(entry.files)


def test_rebuilding_one_precision_keeps_the_other_engines(tmp_path, chat_pkg_session, fake_trt):
    """Reproduced bug: the target directory was removed before the rebuilt precision was written,
    and the merge silently dropped the other precisions' missing files."""
    from mmedge.builds.package import build_package

    pkg = tmp_path / "pkg"
    shutil.copytree(chat_pkg_session, pkg)
    build_package(pkg, backend="tensorrt")
    before = _engines(pkg)
    assert {"vision.fp32", "vision.int8", "llm.int4", "llm.fp32"} <= set(before)
    build_package(pkg, backend="tensorrt", precision="int8")
    after = _engines(pkg)
    assert after == before and all((pkg / rel).is_file() for rel in after.values())


def test_fp16_without_fp16_graphs_is_a_clear_error(tmp_path, chat_pkg_session, fake_trt):
    """Reproduced bug: `--precision fp16` ended in a bare StopIteration / AttributeError."""
    from mmedge.builds.package import build_package

    pkg = tmp_path / "pkg"
    shutil.copytree(chat_pkg_session, pkg)
    with pytest.raises(UnsupportedError, match="no component has a 'fp16' graph"):
        build_package(pkg, backend="tensorrt", precision="fp16")


def test_a_precision_tensorrt_cannot_build_is_skipped_not_fatal(tmp_path, tiny_chat_pkg_session, fake_trt):
    from mmedge.builds.package import build_package
    from mmedge.calibration.package import calibrate_package

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_chat_pkg_session, pkg)
    calibrate_package(pkg, "train-shapes:8", samples=4, weight_bits=(8,), components=["llm"], build=None)
    said: list[str] = []
    out = build_package(pkg, backend="tensorrt", progress=said.append)
    assert "llm.int8" not in _engines(pkg) and "llm.fp32" in _engines(pkg)
    assert "weight-only graph runs on ONNX Runtime" in out["builds"]["llm.int8"]["skipped"]
    assert any(line.startswith("skipped llm.int8") for line in said)


def test_decode_moves_one_token_per_step_not_the_cache(tmp_path, tiny_chat_pkg_session, fake_trt):
    """The KV cache stays on the device: each step uploads its embedding, mask and positions and
    downloads its logits and new keys/values, the same bytes at step 2 as at step 20, and tokens
    match ONNX Runtime on the CPU."""
    from mmedge.runtime.generation import GenerationConfig

    ref, lm, cuda = _language_models(tmp_path, tiny_chat_pkg_session)
    hidden = ref.embed(np.array([[1]])).shape[-1]
    prompt = np.random.default_rng(0).standard_normal((6, hidden)).astype(np.float32)
    config = GenerationConfig.from_kwargs(max_new_tokens=20, min_new_tokens=20)
    assert list(lm.generate_ids(prompt, config)) == list(ref.generate_ids(prompt, config))

    cache = lm.new_cache()
    lm.forward(prompt[None], cache, logits_to_keep=1)
    step, per_step = lm.step_buffers(1), []
    for token in range(20):
        cuda.traffic.clear()
        lm.forward(lm.embed(np.array([[token]])), cache, step)
        per_step.append(dict(cuda.traffic))
    cache_bytes = sum(b.nbytes for b in cache.buffers)
    assert per_step[1] == per_step[-1]  # constant: nothing grows with the cache's length
    up = per_step[-1]["cudaMemcpyHostToDevice"]
    down = per_step[-1]["cudaMemcpyDeviceToHost"]
    # token id in (int64); its embedding out of the embedding engine, then into the decoder with the
    # attention mask (max_context + 1 int64) and the position; the shape tensor `logits_to_keep` is
    # read from host memory, not copied
    assert up == 8 + 4 * hidden + 8 * (lm.max_context + 1) + 8
    # the embedding, the logits and the new keys/values (host mirror of the cache)
    assert down == 4 * hidden + 4 * lm.vocab_size + 2 * lm.layers * lm.kv_heads * lm.head_dim * 4
    assert up + down < cache_bytes / 20
    assert per_step[-1].get("pageable", 0) == 0  # all through pinned staging
    # the host mirror of the cache is the device's: a reload after a host change gives the same logits
    host_cache = lm.new_cache()
    host_cache.fill_rows(cache)
    a = lm.forward(lm.embed(np.array([[3]])), cache).copy()
    b = lm.forward(lm.embed(np.array([[3]])), host_cache)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_each_engine_is_checked_against_its_source_graph(tiny_pkg, fake_trt, monkeypatch):
    """A built engine runs on the component's sample inputs beside its ONNX in ONNX Runtime; one that
    disagrees (here: the fake builder doubles a weight) is skipped, not recorded."""

    from mmedge.builds.package import build_package

    out = build_package(tiny_pkg, backend="tensorrt", precision="fp32")
    assert all(r["rel_error_vs_source"] < 1e-6 for r in out["builds"].values())
    _build_wrong_engines(fake_trt, monkeypatch)
    with pytest.raises(UnsupportedError, match="disagrees with its source graph"):
        build_package(tiny_pkg, backend="tensorrt", precision="fp32")


def test_fp16_graphs_for_gpu_targets(tiny_pkg, fake_trt):
    """`mmedge calibrate --fp16` adds fp16 graphs with their error vs fp32; TensorRT builds them
    strongly typed (no FP16 flag, which 11 does not have) and the CPU keeps running fp32."""
    from mmedge import sdk
    from mmedge.builds.package import build_package
    from mmedge.calibration.fp16 import half_package
    from mmedge.runtime.package import verify_package

    report = half_package(tiny_pkg)["fp16"]
    manifest = verify_package(tiny_pkg).manifest
    for name, entry in manifest.components.items():
        assert (
            entry.precisions["fp16"].parity["rel_error_vs_fp32"] == report[name]["rel_error_vs_fp32"] < 5e-3
        )
        assert min(report[name]["cosine_vs_fp32"].values()) > 0.9999
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    cpu = sdk.Pipeline(str(tiny_pkg))  # auto on the CPU: not fp16
    assert {cpu.runner.precision_of(c) for c in manifest.components} == {"fp32"}
    half = sdk.Pipeline(str(tiny_pkg), precision="fp16")
    assert float((half.embed_images([image]) * cpu.embed_images([image])).sum()) > 0.999
    out = build_package(tiny_pkg, backend="tensorrt", precision="fp16")
    _, config = fake_trt.Builder.last
    assert config._flags == set() and all(r["rel_error_vs_source"] < 1e-6 for r in out["builds"].values())


def test_version_compatible_engines_load_with_host_code_allowed(tiny_pkg, fake_trt, monkeypatch):
    """A version-compatible engine embeds its lean runtime, which TensorRT runs only when the
    runtime allows engine host code: mmedge allows it for such engines alone (hash-checked)."""
    from mmedge import sdk
    from mmedge.builds.package import build_package

    allowed = []
    monkeypatch.setattr(
        fake_trt.Runtime,
        "engine_host_code_allowed",
        property(lambda self: False, lambda self, v: allowed.append(v)),
        raising=False,
    )
    build_package(tiny_pkg, backend="tensorrt", precision="fp32")
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    sdk.Pipeline(str(tiny_pkg), backend="tensorrt", precision="fp32").embed_images([image])
    assert allowed == []
    build_package(tiny_pkg, backend="tensorrt", precision="fp32", settings={"version_compatible": True})
    _, config = fake_trt.Builder.last
    assert config._flags == {"VERSION_COMPATIBLE"}
    sdk.Pipeline(str(tiny_pkg), backend="tensorrt", precision="fp32").embed_images([image])
    assert allowed == [True]


def test_the_gpu_check_script_prints_a_row_per_engine(tiny_pkg, fake_trt, capsys):
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    try:
        import trt_check
    finally:
        sys.path.pop(0)
    assert trt_check.main([str(tiny_pkg), "--precision", "fp32", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"TensorRT {fake_trt.__version__}, Orin (nvgpu) (compute capability 8.7)" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "fp32" in line]
    assert len(rows) == 2 and all(line.split("|")[3].strip() == "0.0e+00" for line in rows)


def test_the_build_plan_needs_neither_tensorrt_nor_a_gpu(tiny_chat_pkg_session, monkeypatch, capsys):
    """`mmedge build --backend tensorrt --plan`: per TensorRT generation, component and precision,
    the flags, the profile with the decoder's shape-tensor values, and the keys."""
    import json

    from mmedge.sdk.cli import main

    for name in ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    pkg = str(tiny_chat_pkg_session)
    assert main(["build", pkg, "--backend", "tensorrt", "--plan", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    by = {(p["tensorrt"], p["component"], p["precision"]): p for p in plans}
    assert {v for v, _, _ in by} == {"10.3.0", "11.1.0"} and len(by) == len(plans) == 10
    assert by["10.3.0", "llm", "fp32"]["network_flags"] == ["STRONGLY_TYPED"]
    assert by["11.1.0", "llm", "fp32"]["network_flags"] == []
    assert all(p["builder_flags"] == [] and not p["skip"] for p in plans)
    values = by["10.3.0", "llm", "fp32"]["shape_values"]
    assert list(values) == ["logits_to_keep"] and values["logits_to_keep"][0] == [1]
    assert by["10.3.0", "llm", "fp32"]["cache_key"] != by["11.1.0", "llm", "fp32"]["cache_key"]
    args = [
        "build",
        pkg,
        "--backend",
        "tensorrt",
        "--plan",
        "--tensorrt-version",
        "11.1.0",
        "--version-compatible",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "TensorRT 10.3" not in text and "builder flags ['VERSION_COMPATIBLE']" in text
    assert "values logits_to_keep: min [1]" in text


def test_beam_search_reorders_the_cache_on_the_device(tmp_path, tiny_chat_pkg_session, fake_trt, monkeypatch):
    """Beam search on the engines gives ONNX Runtime's beams; after the beams' cache is uploaded
    once, the reorders between steps are device-to-device copies and nothing of the cache is
    uploaded again."""
    import mmedge.runtime.backends.tensorrt as trtb
    from mmedge.runtime.beam_search import beam_search
    from mmedge.runtime.generation import GenerationConfig

    ref, lm, cuda = _language_models(tmp_path, tiny_chat_pkg_session)
    hidden = ref.embed(np.array([[1]])).shape[-1]
    config = GenerationConfig.from_kwargs(max_new_tokens=12, min_new_tokens=12, num_beams=3)
    uploads = []
    real = cuda.cudaMemcpyAsync

    def counting(dst, src, nbytes, kind, stream):
        if kind == cuda.cudaMemcpyKind.cudaMemcpyHostToDevice:
            uploads.append(nbytes)
        return real(dst, src, nbytes, kind, stream)

    cuda.cudaMemcpyAsync = counting
    moves = []
    real_reorder = trtb.TensorRTDeviceCache.reorder

    def reorder(self, index, length):
        moves.append(int(np.sum(np.asarray(index) != np.arange(len(index)))))
        return real_reorder(self, index, length)

    monkeypatch.setattr(trtb.TensorRTDeviceCache, "reorder", reorder)
    for seed in range(3):
        prompt = np.random.default_rng(seed).standard_normal((5, hidden)).astype(np.float32)
        uploads.clear()
        ours = beam_search(lm, prompt, config)
        assert ours.tokens == beam_search(ref, prompt, config).tokens
        beams_cache = 2 * lm.layers * 3 * lm.kv_heads * lm.max_context * lm.head_dim * 4
        per_tensor = beams_cache // (2 * lm.layers)
        assert sum(1 for n in uploads if n == per_tensor) == 2 * lm.layers  # the beams' cache: once
    assert sum(moves) > 0  # rows did move: the parity above covers the device reorder


def test_a_device_bundle_checks_each_engine_it_builds(tmp_path, tiny_pkg, store, fake_trt, monkeypatch):
    """A "tensorrt" bundle's engines are built on the device on first use and checked against their
    source graph there (ONNX Runtime is part of the base install): the check is recorded in the
    cache entry, and an engine that disagrees is refused and not kept."""
    import json

    from mmedge import sdk
    from mmedge.builds.bundle import pack_package
    from mmedge.errors import IntegrityError
    from mmedge.runtime.engine_cache import cache_dir, list_engines

    bundle = tmp_path / "bundle"
    pack_package(tiny_pkg, bundle, target="tensorrt", precision="fp32")
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    sdk.Pipeline(str(bundle)).embed_images([image])
    (entry,) = list_engines()
    meta = json.loads((cache_dir() / f"{entry.key}.json").read_text())
    assert meta["check"]["rel_error_vs_source"] < 1e-6

    _build_wrong_engines(fake_trt, monkeypatch)
    with pytest.raises(IntegrityError, match="disagrees with its source graph"):
        sdk.Pipeline(str(bundle)).embed_texts(["a red circle"])
    assert len(list_engines()) == 1  # the text engine was not kept
