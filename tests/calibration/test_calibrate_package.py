"""Package-level calibrate and build: manifest records, reports, verification, runtime use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmedge import sdk
from mmedge.data import generate_scenes
from mmedge.errors import InvalidInputError
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
    assert set(saved["task_metric"]) == {"fp32", "int8"}
    assert saved["task_metric"]["int8"]["precisions"] == {"vision": "int8", "text": "int8"}
    assert report["components"]["vision"]["cosine"] == saved["components"]["vision"]["cosine"]


def test_int8_pipeline_close_to_fp32(calibrated: tuple[Path, dict]) -> None:
    pkg, _ = calibrated
    imgs = [s.image for s in generate_scenes(8, seed=11)]
    a = sdk.Pipeline(str(pkg), precision="fp32").embed_images(imgs)
    b = sdk.Pipeline(str(pkg), precision="int8").embed_images(imgs)
    assert float((a * b).sum(1).min()) > 0.98


def test_impossible_target_keeps_nodes_in_float(tiny_pkg: Path) -> None:
    from mmedge.calibration.package import calibrate_package

    report = calibrate_package(tiny_pkg, "train-shapes:20", samples=12, target_cosine=0.999999, components=["vision"])
    rec = report["components"]["vision"]
    assert rec["float_nodes"], "an unreachable target must keep some nodes in float"
    assert verify_package(tiny_pkg).manifest.components["vision"].precisions["int8"].calibration["met"] == rec["met"]


def test_build_ort_is_used_and_verified(calibrated: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    from mmedge.calibration.build import build_package
    from mmedge.runtime.backends.ort import ort_target

    pkg = tmp_path / "built"
    shutil.copytree(calibrated[0], pkg)
    report = build_package(pkg, backend="ort")
    m = verify_package(pkg).manifest
    assert report["target"] == ort_target() and set(m.engines[ort_target()].files) >= {"vision.int8", "text.int8"}
    imgs = [s.image for s in generate_scenes(4, seed=12)]
    built = sdk.Pipeline(str(pkg), precision="int8").embed_images(imgs)
    plain = sdk.Pipeline(str(calibrated[0]), precision="int8").embed_images(imgs)
    assert float((built * plain).sum(1).min()) > 0.99


def test_bad_arguments(tiny_pkg: Path) -> None:
    from mmedge.calibration.package import calibrate_package

    with pytest.raises(InvalidInputError, match="target-cosine"):
        calibrate_package(tiny_pkg, "train-shapes:8", target_cosine=1.5)
    with pytest.raises(InvalidInputError, match="shapes"):
        calibrate_package(tiny_pkg, "shapes:abc")
    np.testing.assert_equal(sorted(verify_package(tiny_pkg).manifest.components["vision"].precisions), ["fp32"])
