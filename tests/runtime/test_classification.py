"""The classification pipeline (Meta-Transformer packages): logits against PyTorch on the runtime's
prepared inputs, audio clips averaged, labelled probabilities, typed refusals; and the manifest's
`classification` section (labels per path, as many as the logits)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mmedge.data.modalities import SAMPLE_RATE, generate_paired, primitive_clouds
from mmedge.errors import ConfigError, IntegrityError, InvalidInputError
from mmedge.runtime.classification import ClassificationPipeline, softmax
from mmedge.runtime.modality_inputs import prepare_items

SHAPES = ("circle", "square", "triangle", "star")
PRIMITIVES = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")


@pytest.fixture(scope="module")
def pipe(mt_pkg_session: Path) -> ClassificationPipeline:
    from mmedge import sdk

    p = sdk.Pipeline(str(mt_pkg_session), precision="fp32")
    assert isinstance(p, ClassificationPipeline)
    return p


@pytest.fixture(scope="module")
def model(mt_ckpt: Path) -> Any:
    from mmedge.models.sources import load_source

    return load_source(mt_ckpt).model.eval()


def _items(modality: str, n: int = 3) -> list[Any]:
    if modality == "points":
        return list(primitive_clouds(n, seed=5, points=512)[0])
    paired = generate_paired(n, seed=7)
    return [p.audio if modality == "audio" else p.imu for p in paired]


def _reference(model: Any, pipe: ClassificationPipeline, modality: str, items: list[Any]) -> np.ndarray:
    """PyTorch logits of every prepared row, and each item's rows averaged."""
    rate = SAMPLE_RATE if modality == "audio" else None
    sources, counts = prepare_items(pipe.inputs, modality, items, rate)
    with torch.no_grad():
        rows = model(modality, *(torch.from_numpy(v) for v in sources.values()))[0].numpy()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.stack([rows[a : a + c].mean(0) for a, c in zip(starts, counts)])


def test_sdk_opens_a_classification_package_with_its_labels(pipe: ClassificationPipeline) -> None:
    assert pipe.modalities == ("points", "audio", "imu")
    assert pipe.labels == {"points": PRIMITIVES, "audio": SHAPES, "imu": SHAPES}
    assert "classes={points: 6, audio: 4, imu: 4}" in repr(pipe)


@pytest.mark.parametrize("modality", ["points", "audio", "imu"])
def test_logits_match_pytorch_on_the_prepared_inputs(
    pipe: ClassificationPipeline, model: Any, modality: str
) -> None:
    items = _items(modality)
    rate = SAMPLE_RATE if modality == "audio" else None
    got = pipe.logits(items, modality, sample_rate=rate)
    ref = _reference(model, pipe, modality, items)
    assert got.shape == (3, len(pipe.labels[modality])) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.9999, cos


def test_a_batch_array_is_its_items(pipe: ClassificationPipeline) -> None:
    clouds = primitive_clouds(2, seed=5, points=512)[0]  # (2, 512, 3): two clouds
    both = pipe.logits(clouds, "points")
    assert both.shape == (2, 6)
    np.testing.assert_allclose(pipe.logits(clouds[1], "points"), both[1:], atol=1e-5)
    traces = np.stack(_items("imu", 2))  # (2, 6, 2000)
    assert pipe.logits(traces, "imu").shape == (2, 4)


def test_audio_clips_are_averaged(tmp_path: Path) -> None:
    """A recording cut into 3 clips: its logits are the mean of its clips' (as PyTorch gives them);
    a head without labels is labelled "0" .. "N-1"."""
    from mmedge import sdk
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_model
    from mmedge.models.registry import get_family
    from mmedge.models.sources import load_source

    raw = {
        "encoder": {"width": 32, "layers": 1, "heads": 2},
        "points": None,
        "imu": None,
        "audio": {"classes": 3, "clips": 3, "clip_seconds": 0.6},
    }
    ckpt = init_model(get_family("meta-transformer"), raw, tmp_path / "ckpt", seed=1)
    export_model(ckpt, tmp_path / "pkg")
    p = sdk.Pipeline(str(tmp_path / "pkg"), precision="fp32")
    assert isinstance(p, ClassificationPipeline)
    assert p.modalities == ("audio",) and p.labels == {"audio": ("0", "1", "2")}
    items = _items("audio", 2)
    sources, counts = prepare_items(p.inputs, "audio", items, SAMPLE_RATE)
    assert counts.tolist() == [3, 3]
    rows = p.runner.run_path("audio", sources)
    assert not np.allclose(rows[0], rows[1], atol=1e-4)  # the clips differ
    got = p.logits(items, "audio", sample_rate=SAMPLE_RATE)
    np.testing.assert_allclose(got, rows.reshape(2, 3, 3).mean(1), atol=1e-6)
    ref = _reference(load_source(ckpt).model.eval(), p, "audio", items)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_classify_gives_probabilities_best_first(pipe: ClassificationPipeline) -> None:
    items = _items("points", 4)
    probs = softmax(pipe.logits(items, "points"))
    every = pipe.classify(items, "points", top_k=6)
    assert len(every) == 4
    for row, p in zip(every, probs):
        scores = [x.score for x in row]
        assert sorted(x.label for x in row) == sorted(PRIMITIVES)
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-6
        np.testing.assert_allclose(scores, np.sort(p)[::-1], atol=1e-7)
        assert row[0].label == PRIMITIVES[int(np.argmax(p))]
    top = pipe.classify(items, "points")  # top_k=5 by default
    assert [len(r) for r in top] == [5] * 4 and [r[0] for r in top] == [r[0] for r in every]
    assert [len(r) for r in pipe.classify(items[0], "points", top_k=1)] == [1]  # one cloud
    assert [len(r) for r in pipe.classify(items[:2], "points", top_k=100)] == [6, 6]  # every class
    rows = pipe.classify(_items("audio", 2), "audio", top_k=2, sample_rate=SAMPLE_RATE)
    assert [len(r) for r in rows] == [2, 2] and {x.label for r in rows for x in r} <= set(SHAPES)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda p: p.classify(_items("points", 1), "image"),
            r"does not classify 'image'; it classifies points, audio, imu",
        ),
        (lambda p: p.logits(_items("points", 1), "depth"), "does not classify 'depth'"),
        (lambda p: p.classify(_items("points", 1), "points", top_k=0), "top_k must be a positive int"),
        (lambda p: p.classify(_items("points", 1), "points", top_k=True), "top_k"),
        (lambda p: p.classify(_items("points", 1), "points", top_k=2.5), "top_k"),
        (lambda p: p.classify([], "points"), "no points items given"),
        (lambda p: p.logits([np.zeros((10, 3), np.float32)], "points"), r"points #0"),
        (lambda p: p.logits([np.zeros(5, np.float32)], "imu"), r"imu #0: IMU trace has shape"),
        (lambda p: p.logits(_items("audio", 1), "audio"), "needs its sample_rate"),
        (lambda p: p.logits(_items("points", 1), "points", sample_rate=16000), "sample_rate is for audio"),
    ],
)
def test_bad_input_is_a_typed_error(pipe: ClassificationPipeline, call: Any, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        call(pipe)


def test_a_retrieval_package_is_not_classified(tiny_pkg_session: Path) -> None:
    from mmedge.runtime.components import ComponentRunner

    with pytest.raises(InvalidInputError, match="not a classification package"):
        ClassificationPipeline(ComponentRunner(tiny_pkg_session))


def _doc(pkg: Path) -> dict[str, Any]:
    doc = json.loads((pkg / "manifest.json").read_text())
    doc.pop("signature", None)
    return doc


def _parse(doc: dict[str, Any]) -> Any:
    from mmedge.runtime.manifest import parse_manifest

    return parse_manifest(json.dumps(doc))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.pop("classification"), "needs a 'classification' section"),
        (
            lambda d: d["classification"]["labels"]["points"].pop(),
            "has 5 labels; the path's 'logits' has 6 classes",
        ),
        (lambda d: d["classification"]["labels"]["imu"].append("hexagon"), "has 5 labels; .* has 4 classes"),
        (lambda d: d["classification"]["labels"].pop("audio"), "covers paths"),
        (lambda d: d["classification"]["labels"].update(depth=["a"]), "covers paths"),
        (lambda d: d["classification"]["labels"]["imu"].__setitem__(1, "circle"), r"repeat \['circle'\]"),
        (lambda d: d["classification"]["labels"]["imu"].__setitem__(1, " "), "non-empty strings"),
        (lambda d: d["classification"]["labels"]["imu"].__setitem__(1, 3), "expected str"),
        (lambda d: d["classification"]["labels"].update(image=["a"]), "covers paths"),
    ],
)
def test_manifest_labels_fit_every_path(mt_pkg_session: Path, edit: Any, match: str) -> None:
    doc = _doc(mt_pkg_session)
    assert _parse(doc).classification.labels["points"] == PRIMITIVES  # as written
    edit(doc)
    with pytest.raises(IntegrityError, match=match):
        _parse(doc)


def test_only_a_classification_package_has_labels(tiny_pkg_session: Path) -> None:
    doc = _doc(tiny_pkg_session)
    assert _parse(doc).classification is None
    doc["classification"] = {"labels": {"image": ["a", "b"]}}
    with pytest.raises(IntegrityError, match="belongs to a classification package, not a retrieval one"):
        _parse(doc)


def test_config_labels_are_distinct() -> None:
    from mmedge.models.meta_transformer.config import MetaTransformerConfig

    with pytest.raises(ConfigError, match="distinct"):
        MetaTransformerConfig.from_dict({"imu": {"classes": 2, "labels": ["a", "a"]}})
