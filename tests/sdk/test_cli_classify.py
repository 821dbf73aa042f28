"""`mmedge classify` on a classification package: point clouds and IMU traces as .npy arrays, audio
files by path, the package's own labels printed best first; zero-shot image classification of a
retrieval package as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from mmedge.data.modalities import SAMPLE_RATE, generate_paired, primitive_clouds
from mmedge.sdk.cli import main

PRIMITIVES = {"sphere", "cube", "cylinder", "cone", "torus", "pyramid"}
SHAPES = {"circle", "square", "triangle", "star"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("cls-files")
    clouds = primitive_clouds(2, seed=4, points=300)[0]
    paired = generate_paired(2, seed=4)
    out: dict[str, list[str]] = {"points": [], "imu": [], "audio": []}
    for i in range(2):
        np.save(root / f"cloud{i}.npy", clouds[i])
        np.save(root / f"imu{i}.npy", paired[i].imu)
        out["points"].append(str(root / f"cloud{i}.npy"))
        out["imu"].append(str(root / f"imu{i}.npy"))
    sf = pytest.importorskip("soundfile")
    sf.write(root / "clip.wav", paired[0].audio, SAMPLE_RATE)
    np.save(root / "clip.npy", paired[0].audio)
    out["audio"] = [str(root / "clip.wav")]
    out["audio_npy"] = [str(root / "clip.npy")]
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object))
    out["pickled"] = [str(root / "objects.npy")]
    return out


def _json(capsys: pytest.CaptureFixture, argv: list[str]) -> Any:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("modality, labels", [("points", PRIMITIVES), ("imu", SHAPES), ("audio", SHAPES)])
def test_files_of_a_modality_get_the_packages_labels(
    mt_pkg_session: Path, files: dict, modality: str, labels: set, capsys: pytest.CaptureFixture
) -> None:
    argv = ["classify", str(mt_pkg_session), *files[modality], "--modality", modality]
    out = _json(capsys, [*argv, "--json", "-k", "3"])
    assert out["modality"] == modality and [r["file"] for r in out["results"]] == files[modality]
    for r in out["results"]:
        scores = [x["score"] for x in r["labels"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert {x["label"] for x in r["labels"]} <= labels
    assert main(argv) == 0  # the table a person reads: each file, its labels best first
    text = capsys.readouterr().out
    assert text.startswith(f"modality: {modality}") and all(f in text for f in files[modality])
    best = out["results"][0]["labels"][0]
    assert f"{best['label']}" in text and "probability" in text


def test_audio_arrays_take_their_sample_rate(
    mt_pkg_session: Path, files: dict, capsys: pytest.CaptureFixture
) -> None:
    argv = ["classify", str(mt_pkg_session), *files["audio_npy"], "--modality", "audio", "--json"]
    by_array = _json(capsys, [*argv, "--sample-rate", str(SAMPLE_RATE)])
    by_file = _json(
        capsys, ["classify", str(mt_pkg_session), *files["audio"], "--modality", "audio", "--json"]
    )
    assert [x["label"] for x in by_array["results"][0]["labels"]] == [
        x["label"] for x in by_file["results"][0]["labels"]
    ]
    assert main(argv) == 1
    assert "needs its sample_rate" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give --modality: the package classifies points, audio, imu"),
        (["--modality", "image"], "does not classify 'image'"),
        (["--modality", "points", "--labels", "a,b"], "--labels is for zero-shot classification"),
        (["--modality", "points", "-k", "0"], "top_k must be a positive int"),
    ],
)
def test_refusals_name_the_problem(
    mt_pkg_session: Path, files: dict, extra: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["classify", str(mt_pkg_session), *files["points"], *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_files_are_refused(mt_pkg_session: Path, files: dict, capsys: pytest.CaptureFixture) -> None:
    pkg = str(mt_pkg_session)
    assert main(["classify", pkg, files["audio"][0], "--modality", "points"]) == 1
    assert "a point cloud is an (N, 3 + F) .npy array" in capsys.readouterr().err
    assert main(["classify", pkg, *files["pickled"], "--modality", "imu"]) == 1  # no pickle, ever
    assert "is not a readable .npy array" in capsys.readouterr().err
    assert main(["classify", pkg, files["imu"][0], "--modality", "points"]) == 1  # a (6, 2000) "cloud"
    assert "points" in capsys.readouterr().err


def test_a_retrieval_package_classifies_one_image_zero_shot(
    tiny_pkg_session: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import cv2

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((32, 32, 3), np.uint8))
    pkg = str(tiny_pkg_session)
    out = _json(capsys, ["classify", pkg, str(img), "--labels", "circle,square,star", "--json"])
    assert out["image"] == str(img) and {x["label"] for x in out["labels"]} == {"circle", "square", "star"}
    assert (
        len(
            _json(capsys, ["classify", pkg, str(img), "--labels", "circle,square", "-k", "1", "--json"])[
                "labels"
            ]
        )
        == 1
    )
    for argv, message in (
        ([str(img)], "takes one image and --labels"),
        ([str(img), str(img), "--labels", "a,b"], "takes one image and --labels"),
        ([str(img), "--labels", "a,b", "--modality", "audio"], "--modality and --sample-rate are for"),
    ):
        assert main(["classify", pkg, *argv]) == 1
        assert message in capsys.readouterr().err
