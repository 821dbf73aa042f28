"""Device bundles (`mmedge pack`) and files checked as their components load (docs/bundles.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmedge.errors import IntegrityError, InvalidInputError, MemoryBudgetError, UnsupportedError

FRAME = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, chat_pkg_session: Path) -> Path:
    """blip2-tiny packed for ort-cpu at int4: the LLM's int4 build (and its prefill build), the
    encoders' int8 builds, the fp32 token table."""
    from mmedge.builds.bundle import pack_package

    out = tmp_path_factory.mktemp("bundle") / "blip2-tiny-int4"
    pack_package(chat_pkg_session, out, target="ort-cpu", precision="int4")
    return out


def _copy(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def _edit(root: Path, mutate) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads((root / "manifest.json").read_text())
    mutate(raw)
    (root / "manifest.json").write_text(json.dumps(raw))


def _relist(root: Path, rel: str) -> None:
    from mmedge.runtime.package import sha256_file

    _edit(
        root,
        lambda raw: raw["files"].__setitem__(
            rel, {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
        ),
    )


def test_bundle_carries_only_what_runs(bundle: Path, chat_pkg_session: Path) -> None:
    from mmedge.runtime.package import verify_package

    pkg, bun = verify_package(chat_pkg_session).manifest, verify_package(bundle).manifest
    assert bun.bundle is not None and bun.bundle.target == "ort-cpu"
    assert {c: list(e.precisions) for c, e in bun.components.items()} == {
        "vision": ["int8"],
        "qformer": ["int8"],
        "projector": ["int8"],
        "embed": ["fp32"],
        "llm": ["int4"],
    } or all(len(e.precisions) == 1 for e in bun.components.values())
    assert bun.components["llm"].precisions.keys() == {"int4"}
    # every file is a graph the target runs, its weights, or what the runtime reads besides
    graphs = {p.file for c in bun.components.values() for p in c.precisions.values()}
    graphs |= {f for e in bun.engines.values() for f in e.files.values()}
    for rel in bun.files:
        assert rel in graphs or rel.removesuffix(".data") in graphs or rel == "tokenizer.json", rel
    assert not any(rel.startswith("reports/") for rel in bun.files)
    assert sum(e.size for e in bun.files.values()) < sum(e.size for e in pkg.files.values()) / 2
    key = next(iter(bun.engines))
    assert "llm.int4.prefill" in bun.engines[key].files  # the prompt's int8-GEMM build comes along


def test_bundle_answers_as_its_package(bundle: Path, chat_pkg_session: Path) -> None:
    """Same builds, same precisions: the bundle's greedy caption is the package's, token for token."""
    from mmedge import sdk

    want = sdk.Pipeline(chat_pkg_session, precision="auto").caption(FRAME, max_new_tokens=8, min_new_tokens=8)
    got = sdk.Pipeline(bundle).caption(FRAME, max_new_tokens=8, min_new_tokens=8)
    assert got == want


def test_open_reads_no_file_and_a_tampered_one_never_reaches_the_runtime(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmedge import sdk
    from mmedge.runtime.backends import ort as ort_backend

    root = _copy(bundle, tmp_path)
    vision = sdk.Pipeline(root).runner.manifest.components["vision"].precisions["int8"].file
    data = root / (vision + ".data")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))  # not re-hashed: the manifest keeps the packed file's sha256
    made: list[str] = []
    real = ort_backend.OrtSession.__init__

    def spy(self, model, options, name="model", initializers=None):  # type: ignore[no-untyped-def]
        made.append(name)
        real(self, model, options, name, initializers)

    monkeypatch.setattr(ort_backend.OrtSession, "__init__", spy)
    pipe = sdk.Pipeline(root)  # the chat pipeline loads its LLM now; the image path on first use
    assert not any(name.startswith("vision") for name in made)
    with pytest.raises(IntegrityError, match=r"\.data: sha256 differs from the manifest"):
        pipe.caption(FRAME, max_new_tokens=2)
    assert not any(name.startswith("vision") for name in made)  # never handed to ONNX Runtime


def test_a_bundle_for_another_machine_is_refused_naming_both(bundle: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from mmedge import sdk

    root = _copy(bundle, tmp_path)
    _edit(root, lambda raw: raw["bundle"]["runtime"].__setitem__("onnxruntime", "1.0.0"))
    with pytest.raises(
        UnsupportedError, match=rf"onnxruntime 1\.0\.0 builds; this device has onnxruntime {ort.__version__}"
    ):
        sdk.Pipeline(root)
    _edit(root, lambda raw: raw["bundle"]["runtime"].update(onnxruntime=ort.__version__, machine="riscv64"))
    with pytest.raises(UnsupportedError, match=r"on riscv64 .*this device is"):
        sdk.Pipeline(root)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        _edit(root, lambda raw: raw["bundle"].update(target="ort-cuda", runtime={}))
        with pytest.raises(
            UnsupportedError, match=r"packed for ort-cuda \(CUDAExecutionProvider\); this device"
        ):
            sdk.Pipeline(root)


def test_a_bundle_runs_only_with_its_target(bundle: Path) -> None:
    from mmedge import sdk

    with pytest.raises(
        UnsupportedError, match=r"packed for ort-cpu .* asked to run with backend 'ort', device 'cuda'"
    ):
        sdk.Pipeline(bundle, device="cuda")


def test_sessions_load_on_first_use_and_can_be_released(bundle: Path) -> None:
    from mmedge import sdk

    pipe = sdk.Pipeline(bundle)
    runner = pipe.runner
    assert runner.loaded() == ["llm"]  # a chat pipeline reads its LLM's I/O when it opens
    pipe.caption(FRAME, max_new_tokens=2)
    assert {"vision", "qformer", "projector", "llm"} <= set(runner.loaded())
    released = runner.release("llm")
    assert "llm" in released and not any(k.startswith("llm") for k in runner.loaded())
    assert isinstance(pipe.caption(FRAME, max_new_tokens=2), str)  # loads it again
    assert "llm" in runner.loaded()


def test_a_clip_text_tower_loads_when_texts_are_embedded(tiny_pkg_session: Path) -> None:
    from mmedge import sdk

    pipe = sdk.Pipeline(tiny_pkg_session)
    assert pipe.runner.loaded() == []
    pipe.embed_images([FRAME])
    assert pipe.runner.loaded() == ["vision"]
    pipe.embed_texts(["a red circle"])
    assert pipe.runner.loaded() == ["text", "vision"]
    assert pipe.runner.release() == ["text", "vision"] and pipe.runner.loaded() == []


def test_memory_budget(bundle: Path) -> None:
    from mmedge import sdk

    need = sdk.Pipeline(bundle).runner.estimated_bytes() / 2**20
    assert need > 0
    sdk.Pipeline(bundle, memory_budget_mb=need + 1)
    with pytest.raises(MemoryBudgetError, match=r"needs about \d+ MB .* the budget is 0\.01 MB"):
        sdk.Pipeline(bundle, memory_budget_mb=0.01)
    with pytest.raises(InvalidInputError):
        sdk.Pipeline(bundle, memory_budget_mb=-1)


def test_second_load_does_not_parse_the_graphs(bundle: Path, tmp_path: Path) -> None:
    """A graph whose exact bytes passed the full check here before is handed to ONNX Runtime
    unparsed: the onnx package is not even imported."""
    code = (
        "import sys, numpy as np\n"
        "from mmedge import sdk\n"
        f"p = sdk.Pipeline({str(bundle)!r}, preload=True)\n"
        "p.caption(np.zeros((48, 64, 3), np.uint8), max_new_tokens=2)\n"
        "print('onnx' in sys.modules)\n"
    )
    env = {**os.environ, "MMEDGE_HOME": str(tmp_path / "home")}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.split()[-1] == "True"  # checked, then recorded
    assert again.stdout.split()[-1] == "False"
    assert any((tmp_path / "home" / ".checked").iterdir())


def test_a_record_is_keyed_by_the_bytes(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph changed and re-hashed into the manifest has no record: it is parsed and checked."""
    import onnx

    from mmedge import sdk

    root = _copy(bundle, tmp_path)
    rel = sdk.Pipeline(root).runner.manifest.components["projector"].precisions["int8"].file
    sdk.Pipeline(root, preload=True)  # records every graph
    model = onnx.load(str(root / rel), load_external_data=False)
    model.graph.node[0].op_type = "Loop"  # an operator no build produces
    onnx.save(model, str(root / rel))
    _relist(root, rel)
    with pytest.raises(UnsupportedError, match="operator Loop"):
        sdk.Pipeline(root, preload=True)


def test_pack_refuses_what_it_cannot_pack(bundle: Path, chat_pkg_session: Path, tmp_path: Path) -> None:
    from mmedge.builds.bundle import pack_package, pick_precision

    with pytest.raises(UnsupportedError, match="already a device bundle"):
        pack_package(bundle, tmp_path / "again")
    with pytest.raises(InvalidInputError, match="target 'jetson'"):
        pack_package(chat_pkg_session, tmp_path / "x", target="jetson")
    with pytest.raises(InvalidInputError, match="--portable applies to the ort-cpu target"):
        pack_package(chat_pkg_session, tmp_path / "x", target="tensorrt", portable=True)
    with pytest.raises(InvalidInputError, match="must not be the package itself"):
        pack_package(chat_pkg_session, chat_pkg_session, force=True)
    assert pick_precision(["fp32", "int8"], "int4") == "int8"
    assert pick_precision(["fp32", "int4"], "int8") == "fp32"
    assert pick_precision(["int4"], "fp32") is None


def test_portable_and_tensorrt_bundles_carry_the_qdq_graphs(chat_pkg_session: Path, tmp_path: Path) -> None:
    from mmedge import sdk
    from mmedge.builds.bundle import pack_package

    out = pack_package(chat_pkg_session, tmp_path / "portable", precision="int8", portable=True)
    assert all(rel.startswith("onnx/") for rel in out["files"].values()), out["files"]
    pipe = sdk.Pipeline(tmp_path / "portable")
    assert (
        pipe.runner.manifest.engines == {} and pipe.runner.manifest.bundle.runtime == {}
    )  # any ORT, any CPU
    out = pack_package(chat_pkg_session, tmp_path / "trt", target="tensorrt", precision="int8")
    assert all(rel.startswith("onnx/") for rel in out["files"].values())


def test_bench_load_reports_open_first_call_and_peak_rss(bundle: Path) -> None:
    from mmedge.sdk.load_bench import bench_load

    r = bench_load(bundle, runs=1, tokens=2)
    assert r["pipeline"] == "ChatPipeline" and r["runs"] == 1
    for key in ("import_s", "open_s", "first_call_s"):
        assert 0 < r[key] < 120
    assert 20 < r["rss_open_mb"] <= r["peak_rss_mb"] < 4096


def test_preload_a_path_or_refuse_an_unknown_name(tiny_pkg_session: Path) -> None:
    from mmedge import sdk

    assert sdk.Pipeline(tiny_pkg_session, preload="image").runner.loaded() == ["vision"]
    assert sdk.Pipeline(tiny_pkg_session, preload=["text"]).runner.loaded() == ["text"]
    assert sdk.Pipeline(tiny_pkg_session, preload=True).runner.loaded() == ["text", "vision"]
    with pytest.raises(InvalidInputError, match=r"cannot preload \['llm'\]: package 'clip-tiny' has paths"):
        sdk.Pipeline(tiny_pkg_session, preload="llm")


def test_a_bundle_carries_only_the_paths_it_is_asked_for(tmp_path: Path, mt_pkg_session: Path) -> None:
    """`mmedge pack --paths`: a device that embeds camera frames and IMU traces carries no audio or
    depth encoder; the paths left out go with the components only they use and their sections."""
    from mmedge import sdk
    from mmedge.builds.bundle import pack_package
    from mmedge.errors import InvalidInputError
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_checkpoint
    from mmedge.runtime.package import verify_package

    ib = tmp_path / "ib"
    export_model(init_checkpoint("imagebind-tiny", tmp_path / "ckpt", seed=0), ib)
    out = pack_package(ib, tmp_path / "b", precision="fp32", paths=["image", "text", "imu"])
    m = verify_package(tmp_path / "b").manifest
    assert sorted(m.pipeline.paths) == ["image", "imu", "text"] and sorted(m.components) == [
        "imu",
        "text",
        "vision",
    ]
    assert m.modalities is not None and m.modalities.present() == ("imu",)
    assert not any("audio" in rel or "depth" in rel for rel in m.files)
    everything = pack_package(ib, tmp_path / "all", precision="fp32")
    assert out["bytes"] < everything["bytes"] - 1_000_000  # the audio, depth and thermal encoders
    pipe = sdk.Pipeline(str(tmp_path / "b"))
    assert pipe.embed(np.zeros((6, 2000), np.float32), modality="imu").shape == (1, 96)
    with pytest.raises(InvalidInputError, match="audio"):
        pipe.embed(np.zeros(32000, np.float32), modality="audio")
    with pytest.raises(InvalidInputError, match="needs a pipeline path 'text'"):
        pack_package(ib, tmp_path / "c", precision="fp32", paths=["image", "audio"])
    with pytest.raises(InvalidInputError, match=r"\['sonar'\] are not paths"):
        pack_package(ib, tmp_path / "c", precision="fp32", paths=["image", "text", "sonar"])
    # a classification package keeps the shared encoder and the labels of what it carries
    pack_package(mt_pkg_session, tmp_path / "mt", precision="fp32", paths=["points"])
    mt = verify_package(tmp_path / "mt").manifest
    assert list(mt.pipeline.paths) == ["points"] and mt.classification is not None
    assert list(mt.classification.labels) == ["points"] and len(mt.components) == 3
