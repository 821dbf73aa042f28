"""`mmedge eval` on classification packages: held-out synthetic accuracy per modality, truths found
among the package's labels by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from mmedge.data.modalities import PRIMITIVES, shape_signals
from mmedge.data.scenes import SHAPES
from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.evaluation.tasks import evaluate_classification


@pytest.fixture(scope="module")
def pipe(mt_pkg_session: Path) -> Any:
    from mmedge import sdk

    return sdk.Pipeline(str(mt_pkg_session))


def test_accuracy_per_modality_with_its_chance(pipe: Any) -> None:
    out = evaluate_classification(pipe, n=12)
    assert out["task"] == "classification" and out["n"] == 12 and "skipped" not in out
    for m, classes in (("points", 6), ("audio", 4), ("imu", 4)):
        assert 0.0 <= out[m]["accuracy"] <= 1.0
        assert out[m]["classes"] == classes and out[m]["chance"] == round(1 / classes, 4)
    assert out["precisions"] == dict.fromkeys(pipe.runner.manifest.components, "fp32")
    assert evaluate_classification(pipe, n=12) == out  # held-out data: the same every time


def test_truths_are_found_by_label_name(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels in another order than the synthetic classes: a model that names each item's class
    scores 1.0 only if truths are mapped by name (items cycle through the classes in order)."""
    order = {
        "points": tuple(reversed(PRIMITIVES)),
        "audio": ("star", "circle", "triangle", "square"),
        "imu": ("square", "star", "circle", "triangle"),
    }
    classes = {"points": PRIMITIVES, "audio": SHAPES, "imu": SHAPES}

    def oracle(items: list, modality: str, *, sample_rate: int | None = None) -> np.ndarray:
        names = classes[modality]
        columns = [order[modality].index(names[i % len(names)]) for i in range(len(items))]
        return np.eye(len(names), dtype=np.float32)[columns]

    monkeypatch.setattr(pipe, "labels", order)
    monkeypatch.setattr(pipe, "logits", oracle)
    out = evaluate_classification(pipe, n=24)
    assert [out[m]["accuracy"] for m in ("points", "audio", "imu")] == [1.0, 1.0, 1.0]


def test_labels_that_are_not_the_synthetic_classes(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipe, "labels", {**pipe.labels, "points": tuple(str(i) for i in range(6))})
    out = evaluate_classification(pipe, n=4)
    assert "points" not in out and set(out) >= {"audio", "imu"}
    assert "not the synthetic classes" in out["skipped"]["points"]
    monkeypatch.setattr(pipe, "labels", {m: tuple("abcdef"[: len(v)]) for m, v in pipe.labels.items()})
    with pytest.raises(UnsupportedError, match=r"cannot score it: points: .*; audio: .*; imu: "):
        evaluate_classification(pipe, n=4)


@pytest.mark.parametrize("n", [0, -1, True, 2.5])
def test_a_bad_count_is_refused(pipe: Any, n: Any) -> None:
    with pytest.raises(InvalidInputError, match="item count"):
        evaluate_classification(pipe, n=n)


def test_a_retrieval_pipeline_is_refused(tiny_pkg_session: Path) -> None:
    from mmedge import sdk

    with pytest.raises(UnsupportedError, match="need a classification package"):
        evaluate_classification(sdk.Pipeline(str(tiny_pkg_session)), n=4)


def test_shape_signals_are_balanced_and_deterministic() -> None:
    traces, labels = shape_signals(9, seed=3, modality="imu")
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0] and traces[0].shape == (6, 2000)
    again, _ = shape_signals(10, seed=3, modality="imu")
    assert all(np.array_equal(a, b) for a, b in zip(traces, again))  # item i depends on (seed, i)
    clips, _ = shape_signals(2, seed=3, modality="audio")
    assert clips[0].shape == (32000,) and clips[0].dtype == np.float32
    with pytest.raises(InvalidInputError, match="audio or imu"):
        shape_signals(2, seed=3, modality="depth")


def test_cli_eval_dispatches_by_task(mt_pkg_session: Path, capsys: pytest.CaptureFixture) -> None:
    from mmedge.sdk.cli import main

    assert main(["eval", str(mt_pkg_session), "--limit", "8", "--data", "shapes:5", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["n"] == 8 and {"points", "audio", "imu"} <= set(out)
    assert "--data do not apply to a classification package" in captured.err
