"""Package-level calibrate and build: manifest records, reports, verification, runtime use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmedge import sdk
from mmedge.data import generate_scenes
from mmedge.errors import InvalidInputError, UnbuiltPrecisionWarning
from mmedge.runtime.package import verify_package


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, tiny_pkg_session: Path) -> tuple[Path, dict]:
    import shutil

    from mmedge.calibration.package import calibrate_package

    pkg = tmp_path_factory.mktemp("cal") / "clip-tiny"
    shutil.copytree(tiny_pkg_session, pkg)
    report = calibrate_package(pkg, "train-shapes:40", samples=24, target_cosine=0.99)
    return pkg, report


def test_calibration_record_and_report(calibrated: tuple[Path, dict]) -> None:
    pkg, report = calibrated
    m = verify_package(pkg).manifest
    for name in ("vision", "text"):
        int8 = m.components[name].precisions["int8"]
        rec = int8.calibration
        assert rec["method"] == "minmax" and rec["samples"] == 24 and rec["target"] == 0.99
        assert isinstance(rec["float_nodes"], list)
        assert min(rec["cosine"].values()) >= 0.99 and rec["met"] is True
        assert int8.parity["trt_lint_ok"] is True
    saved = json.loads((pkg / "reports" / "calibration.json").read_text())
    assert set(saved["task_metric"]) == {"fp32", "quantized"}
    assert saved["task_metric"]["quantized"]["precisions"] == {"vision": "int8", "text": "int8"}
    assert report["components"]["vision"]["cosine"] == saved["components"]["vision"]["cosine"]


def test_int8_pipeline_close_to_fp32(calibrated: tuple[Path, dict]) -> None:
    pkg, _ = calibrated
    imgs = [s.image for s in generate_scenes(8, seed=11)]
    a = sdk.Pipeline(str(pkg), precision="fp32").embed_images(imgs)
    b = sdk.Pipeline(str(pkg), precision="int8").embed_images(imgs)
    assert float((a * b).sum(1).min()) > 0.98


def test_impossible_target_keeps_nodes_in_float(tiny_pkg: Path) -> None:
    from mmedge.calibration.package import calibrate_package

    report = calibrate_package(
        tiny_pkg, "train-shapes:20", samples=12, target_cosine=0.999999, components=["vision"], build=None
    )
    rec = report["components"]["vision"]
    assert rec["float_nodes"], "an unreachable target must keep some nodes in float"
    assert (
        verify_package(tiny_pkg).manifest.components["vision"].precisions["int8"].calibration["met"]
        == rec["met"]
    )


def test_build_ort_is_used_and_verified(calibrated: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    from mmedge.builds.package import build_package
    from mmedge.runtime.backends.ort import ort_target

    pkg = tmp_path / "built"
    shutil.copytree(calibrated[0], pkg)
    report = build_package(pkg, backend="ort")
    m = verify_package(pkg).manifest
    assert report["target"] == ort_target() and set(m.engines[ort_target()].files) >= {
        "vision.int8",
        "text.int8",
    }
    builds = report["builds"]
    # unmasked vision attention becomes QAttention (3 layers); the text tower's masked attention stays
    assert builds["vision.int8"]["ops"].get("com.microsoft:QAttention") == 3
    assert "Softmax" not in builds["vision.int8"]["ops"]
    assert "com.microsoft:QAttention" not in builds["text.int8"]["ops"]
    assert all(b["rel_error_vs_source"] <= 1e-3 for b in builds.values())
    imgs = [s.image for s in generate_scenes(4, seed=12)]
    built = sdk.Pipeline(str(pkg), precision="int8").embed_images(imgs)
    plain = sdk.Pipeline(str(calibrated[0]), precision="int8").embed_images(imgs)
    assert float((built * plain).sum(1).min()) > 0.99


def test_building_some_precisions_keeps_the_others(calibrated: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    from mmedge.builds.package import build_package
    from mmedge.runtime.backends.ort import ort_target

    pkg = tmp_path / "pkg"
    shutil.copytree(calibrated[0], pkg)
    build_package(pkg, backend="ort", precision="int8")
    build_package(pkg, backend="ort", precision="fp32")
    files = verify_package(pkg).manifest.engines[ort_target()].files
    assert set(files) == {"vision.int8", "text.int8", "vision.fp32", "text.fp32"}


def test_attention_fusion_is_exact(calibrated: tuple[Path, dict], tmp_path: Path) -> None:
    from mmedge.builds.ort import optimize_for_ort
    from mmedge.builds.sessions import ort_session

    src = calibrated[0] / "onnx" / "vision.int8.onnx"
    fused, plain = tmp_path / "fused.onnx", tmp_path / "plain.onnx"
    assert optimize_for_ort(src, fused)["com.microsoft:QAttention"] == 3
    assert "com.microsoft:QAttention" not in optimize_for_ort(src, plain, fuse_attention=False)
    x = np.random.default_rng(3).standard_normal((5, 3, 64, 64)).astype(np.float32)
    a, b = (ort_session(p).run(None, {"pixel_values": x})[0] for p in (fused, plain))
    np.testing.assert_allclose(a, b, atol=1e-4)
    # the merged [Wq|Wk|Wv] replaces the three weights: the built file carries no unread initializer
    import onnx

    model = onnx.load(str(fused))
    read = {i for n in model.graph.node for i in n.input}
    assert [i.name for i in model.graph.initializer if i.name not in read] == []
    assert fused.stat().st_size < plain.stat().st_size


def test_build_refuses_a_graph_that_disagrees_with_its_source(
    calibrated: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from mmedge.builds import ort as ort_build
    from mmedge.builds.package import build_package
    from mmedge.errors import IntegrityError

    fuse = ort_build.attention_to_qattention

    def wrong_heads(model) -> int:  # a fusion bug: right pattern, wrong head count
        n = fuse(model)
        for node in model.graph.node:
            if node.op_type == "QAttention":
                next(a for a in node.attribute if a.name == "num_heads").i = 1
        return n

    pkg = tmp_path / "pkg"
    shutil.copytree(calibrated[0], pkg)
    before = {p.relative_to(pkg): p.read_bytes() for p in pkg.rglob("*") if p.is_file()}
    monkeypatch.setattr(ort_build, "attention_to_qattention", wrong_heads)
    with pytest.raises(IntegrityError, match="disagrees with its source"):
        build_package(pkg, backend="ort", precision="int8")
    assert {p.relative_to(pkg): p.read_bytes() for p in pkg.rglob("*") if p.is_file()} == before
    verify_package(pkg)


def test_bad_arguments(tiny_pkg: Path) -> None:
    from mmedge.calibration.package import calibrate_package

    with pytest.raises(InvalidInputError, match="target-cosine"):
        calibrate_package(tiny_pkg, "train-shapes:8", target_cosine=1.5)
    with pytest.raises(InvalidInputError, match="shapes"):
        calibrate_package(tiny_pkg, "shapes:abc")
    np.testing.assert_equal(
        sorted(verify_package(tiny_pkg).manifest.components["vision"].precisions), ["fp32"]
    )


def test_recalibration_drops_builds_of_the_old_weights(calibrated: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    from mmedge.builds.package import build_package
    from mmedge.calibration.package import calibrate_package
    from mmedge.runtime.backends.ort import ort_target

    pkg = tmp_path / "pkg"
    shutil.copytree(calibrated[0], pkg)
    build_package(pkg, backend="ort")
    calibrate_package(
        pkg, "train-shapes:40", samples=16, target_cosine=0.99, components=["vision"], build=None
    )
    files = verify_package(pkg).manifest.engines[ort_target()].files
    assert set(files) == {
        "vision.fp32",
        "text.fp32",
        "text.int8",
    }  # vision.int8 was built from the old weights
    assert not list(pkg.glob("builds/*/vision.int8.onnx"))
    with pytest.warns(UnbuiltPrecisionWarning, match="mmedge build"):
        p = sdk.Pipeline(str(pkg), precision="int8")  # runs the new Q/DQ file until it is built again
        assert p.embed_images([generate_scenes(1, seed=0)[0].image]).shape[0] == 1
    build_package(pkg, backend="ort")
    assert "vision.int8" in verify_package(pkg).manifest.engines[ort_target()].files


def test_calibrate_builds_for_ort_by_default(calibrated: tuple[Path, dict]) -> None:
    """The fast path is the default: calibrate builds, so int8 never runs unbuilt (slower than fp32)."""
    import warnings

    from mmedge.runtime.backends.ort import ort_target

    pkg, report = calibrated
    files = verify_package(pkg).manifest.engines[ort_target()].files
    assert {"vision.int8", "text.int8"} <= set(files) and report["build"]["backend"] == "ort"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnbuiltPrecisionWarning)
        sdk.Pipeline(str(pkg), precision="int8").embed_images([generate_scenes(1, seed=0)[0].image])


def test_chat_packages_get_a_vqa_task_metric(chat_pkg_session: Path) -> None:
    saved = json.loads((chat_pkg_session / "reports" / "calibration.json").read_text())
    metric = saved["task_metric"]
    assert set(metric) == {"fp32", "quantized"}
    assert metric["quantized"]["precisions"]["llm"] == "int4" and metric["fp32"]["questions"] > 0
    assert 0.0 <= metric["quantized"]["vqa_accuracy"] <= 1.0


def test_an_llm_below_the_target_is_reported_and_hints_follow_the_state(tmp_path: Path) -> None:
    import shutil

    from mmedge.builds.package import build_package
    from mmedge.calibration.package import calibrate_package
    from mmedge.errors import UnsupportedError
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_checkpoint

    ckpt = init_checkpoint("blip2-tiny", tmp_path / "ckpt")
    export_model(ckpt, tmp_path / "pkg")
    said: list[str] = []
    build_package(tmp_path / "pkg", progress=said.append)
    assert any("only fp32 graphs; `mmedge calibrate`" in m for m in said)
    with pytest.raises(UnsupportedError, match="run `mmedge calibrate`"):
        sdk.Pipeline(str(tmp_path / "pkg"), precision="int4")
    with pytest.raises(UnsupportedError, match=r"`mmedge calibrate PKG --fp16` writes fp16 graphs"):
        sdk.Pipeline(str(tmp_path / "pkg"), precision="fp16")
    said.clear()
    report = calibrate_package(
        tmp_path / "pkg",
        "train-shapes:12",
        samples=8,
        target_cosine=0.999999,
        build=None,
        progress=said.append,
    )
    assert report["components"]["llm"]["int4"]["met"] is False
    assert any(m.startswith("warning: llm int4 logits cosine") for m in said)
    shutil.rmtree(tmp_path / "ckpt")


def test_requantizing_another_bit_width_keeps_measuring_the_existing_one(
    chat_pkg_session: Path, tmp_path: Path
) -> None:
    """A package with an int4 LLM calibrated again for int8 only: both weight-only precisions are
    measured, the one not requantized now included (its report entry used to be missing: KeyError)."""
    import shutil

    from mmedge.calibration.package import calibrate_package

    pkg = Path(shutil.copytree(chat_pkg_session, tmp_path / "pkg"))
    report = calibrate_package(
        pkg, "train-shapes:8", samples=4, components=["llm"], weight_bits=(8,), build=None
    )
    measured = report["components"]["llm"]
    assert {"int4", "int8"} <= set(measured) and all("logits_cosine" in measured[p] for p in ("int4", "int8"))
