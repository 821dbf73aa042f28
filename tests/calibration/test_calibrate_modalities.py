"""Calibrating the further modalities' encoders (ImageBind's audio, depth, thermal, IMU) on the
synthetic scenes' paired data, and leaving them in fp32 for data that has none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def imagebind_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_checkpoint

    root = tmp_path_factory.mktemp("ibcal")
    export_model(init_checkpoint("imagebind-tiny", root / "ckpt", seed=0), root / "pkg")
    return root / "pkg"


def test_every_modality_encoder_gets_int8_from_paired_scenes(imagebind_pkg: Path, tmp_path: Path) -> None:
    import shutil

    from mmedge import sdk
    from mmedge.calibration.package import calibrate_package
    from mmedge.data.modalities import SAMPLE_RATE, generate_paired

    pkg = tmp_path / "pkg"
    shutil.copytree(imagebind_pkg, pkg)
    report = calibrate_package(pkg, "train-shapes:20", samples=12)
    for name in ("audio", "depth", "thermal", "imu", "vision", "text"):
        rec = report["components"][name]
        assert rec["met"] and min(rec["cosine"].values()) >= 0.99, name
    fp32, int8 = sdk.Pipeline(str(pkg), precision="fp32"), sdk.Pipeline(str(pkg), precision="int8")
    scenes = generate_paired(4, seed=5)
    for modality in ("audio", "depth", "thermal", "imu"):
        assert int8.runner.precision_of(modality) == "int8"
        data = [p.data(modality) for p in scenes]
        rate = SAMPLE_RATE if modality == "audio" else None
        a, b = (p.embed(data, modality, sample_rate=rate) for p in (fp32, int8))
        assert np.min(np.sum(a * b, axis=1)) > 0.99, modality


def test_data_without_paired_modalities_leaves_them_fp32(imagebind_pkg: Path, tmp_path: Path) -> None:
    import shutil

    import cv2

    from mmedge.calibration.package import calibrate_package
    from mmedge.data import generate_scenes

    pkg = tmp_path / "pkg"
    shutil.copytree(imagebind_pkg, pkg)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, s in enumerate(generate_scenes(6, seed=3)):
        cv2.imwrite(str(folder / f"{i}.png"), s.image[:, :, ::-1])
    report = calibrate_package(pkg, str(folder), samples=4, build=None)
    assert report["components"]["audio"] == {"skipped": "no audio in the calibration data"}
    assert report["components"]["vision"]["met"]
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert set(manifest["components"]["audio"]["precisions"]) == {"fp32"}
