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


def test_a_shared_encoder_is_calibrated_once_on_every_path(mt_pkg_session: Path, tmp_path: Path) -> None:
    """Meta-Transformer: each tokenizer and head on its modality's examples, the one encoder graph on
    the tokens of every modality (their sequences differ in length), all to INT8 Q/DQ."""
    import shutil

    from mmedge.calibration.package import calibrate_package
    from mmedge.runtime.package import verify_package

    pkg = tmp_path / "mt"
    shutil.copytree(mt_pkg_session, pkg)
    said: list[str] = []
    report = calibrate_package(pkg, "train-shapes:8", samples=6, build=None, progress=said.append)
    m = verify_package(pkg).manifest
    assert all("int8" in c.precisions for c in m.components.values()), sorted(m.components)
    assert m.components["encoder"].calibration_data == "shared"
    paths = [p for p in m.pipeline.paths if any(s.component == "encoder" for s in m.pipeline.paths[p].steps)]
    assert len(paths) == 3  # points, audio and IMU tokens in one calibration
    assert any(line.startswith(f"calibrate encoder on {2 * len(paths)} samples") for line in said), said
    assert min(report["components"]["encoder"]["cosine"].values()) >= 0.99
    assert report["components"]["points_tokenizer"]["data"] == "train-shapes:8"
    # a classification package calibrates on its tasks' examples (`labelled_examples`)
    from mmedge.data.sources import load_modality_data

    clouds = load_modality_data("train-shapes:4", "points")
    assert clouds is not None and len(clouds) == 4 and clouds[0].shape == (1024, 3)
    traces = load_modality_data("train-shapes:4", "imu", task="classification")
    assert traces is not None and traces[0].shape == (6, 2000)
