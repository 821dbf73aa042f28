"""Retrieval pipeline on a random-weight package: shapes, normalisation, consistency, errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from mmedge import sdk
from mmedge.data import generate_scenes
from mmedge.errors import InvalidInputError, ModelNotFoundError, UnsupportedError


@pytest.fixture(scope="module")
def pipe(tiny_pkg_session: Path):
    return sdk.Pipeline(str(tiny_pkg_session))


def test_embeddings_are_normalised_and_input_forms_agree(pipe, tmp_path: Path) -> None:
    img = generate_scenes(1, seed=5)[0].image
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), img[:, :, ::-1])
    e_arr = pipe.embed_images([img])
    e_bgr = pipe.embed_images([np.ascontiguousarray(img[:, :, ::-1])], channel_order="BGR")
    e_path = pipe.embed_images([str(path)])
    e_bytes = pipe.embed_images([path.read_bytes()])
    assert e_arr.shape == (1, pipe.dim) and e_arr.dtype == np.float32
    assert np.isclose(np.linalg.norm(e_arr), 1.0, atol=1e-5)
    for other in (e_bgr, e_path, e_bytes):
        np.testing.assert_allclose(other, e_arr, atol=1e-5)
    t = pipe.embed_texts(["a red circle", "a blue square at the top left"])
    assert t.shape == (2, pipe.dim) and np.allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)


def test_batching_matches_single(pipe) -> None:
    imgs = [s.image for s in generate_scenes(70, seed=3)]  # beyond the max batch of 64: chunked
    batch = pipe.embed_images(imgs)
    single = np.concatenate([pipe.embed_images([im]) for im in imgs[:3]])
    np.testing.assert_allclose(batch[:3], single, atol=1e-5)
    texts = ["a red circle", "a small green star at the bottom right and a large blue square in the center"]
    both = pipe.embed_texts(texts)  # padded batch
    np.testing.assert_allclose(both[0], pipe.embed_texts(texts[:1])[0], atol=1e-5)


def test_index_search_and_classify(pipe) -> None:
    from mmedge.runtime.components import ComponentRunner
    from mmedge.runtime.retrieval import RetrievalPipeline

    p = RetrievalPipeline(ComponentRunner(pipe.runner.package))  # fresh index
    imgs = [s.image for s in generate_scenes(10, seed=9)]
    ids = p.add_images(imgs, labels=[f"img{i}" for i in range(10)])
    assert ids == list(range(10))
    hits = p.search(imgs[4], k=3)
    assert hits[0].id == 4 and hits[0].label == "img4" and hits[0].score > 0.999
    assert len(p.search("a red circle", k=4)) == 4
    labels = p.classify(imgs[0], ["circle", "square", "star"])
    assert sorted(lab.label for lab in labels) == ["circle", "square", "star"]
    assert abs(sum(lab.score for lab in labels) - 1.0) < 1e-5


def test_a_package_without_itm_does_not_rerank(pipe) -> None:
    from mmedge.runtime.components import ComponentRunner
    from mmedge.runtime.retrieval import RetrievalPipeline

    p = RetrievalPipeline(ComponentRunner(pipe.runner.package))
    assert p.itm is None
    p.add_images([s.image for s in generate_scenes(3, seed=2)], labels=["a", "b", "c"])
    assert all(h.itm is None for h in p.search("a red circle", k=2))  # the default: off
    with pytest.raises(InvalidInputError, match="no ITM component"):
        p.search("a red circle", k=2, rerank=2)
    with pytest.raises(InvalidInputError, match="no ITM component"):
        p.itm_scores(generate_scenes(1, seed=1)[0].image, ["a red circle"])


def test_unknown_name_lists_store(store: Path, tiny_pkg_session: Path) -> None:
    import shutil

    shutil.copytree(tiny_pkg_session, store / "clip-tiny")
    assert sdk.Pipeline("clip-tiny").dim > 0
    with pytest.raises(ModelNotFoundError, match="clip-tiny"):
        sdk.Pipeline("blip2")


def test_precision_not_built(tiny_pkg_session: Path) -> None:
    p = sdk.Pipeline(str(tiny_pkg_session), precision="int8")
    with pytest.raises(UnsupportedError, match="calibrate"):
        p.embed_texts(["x"])


def test_bad_calls(pipe) -> None:
    with pytest.raises(InvalidInputError):
        pipe.embed_images([])
    with pytest.raises(InvalidInputError):
        pipe.classify(generate_scenes(1, seed=1)[0].image, ["ok", ""])
    with pytest.raises(InvalidInputError):
        pipe.classify(generate_scenes(1, seed=1)[0].image, ["a"], templates=["no placeholder"])
