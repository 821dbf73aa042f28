"""The Milvus index on Milvus Lite (a local file): recall against exact search, ids and labels that
round-trip, and a retrieval pipeline adding, searching and removing through it (API and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the milvus extra (pymilvus) is not installed")
pytest.importorskip("milvus_lite", reason="the milvus extra (milvus-lite) is not installed")

from mmedge import sdk
from mmedge.data import generate_scenes
from mmedge.errors import IntegrityError, InvalidInputError
from mmedge.runtime import milvus_index
from mmedge.runtime.indexes import open_index
from mmedge.runtime.milvus_index import MilvusIndex
from mmedge.sdk.cli import main


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_recall_at_10_against_exact_search_on_5000_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"milvus-lite://{tmp_path}/v.db?collection=recall"
    data, queries = _unit(5000, 64, 0), _unit(200, 64, 1)  # random vectors: HNSW's hardest case
    idx = open_index(uri, 64, model="m")
    assert isinstance(idx, MilvusIndex)
    idx.add(np.arange(5000), data)
    idx.save()
    idx.close()
    idx = open_index(uri, 64, create=False)
    assert isinstance(idx, MilvusIndex)
    # Loaded afresh, as another process would: Milvus Lite then answers from the HNSW graph built on
    # flush (the writing process keeps searching its flushed rows exactly).
    idx.client.release_collection("recall")
    idx.client.load_collection("recall")
    info = idx.client.describe_index("recall", "vector")
    assert (info["index_type"], info["metric_type"], info["indexed_rows"]) == ("HNSW", "IP", 5000)
    hits = idx.search(queries, k=10)
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    recall = np.mean([len({h.id for h in row} & set(want)) / 10 for row, want in zip(hits, exact)])
    assert recall >= 0.99, recall
    monkeypatch.setattr(milvus_index, "SEARCH_EF", 10)  # a narrow HNSW search misses: the graph answers
    narrow = idx.search(queries, k=10)
    assert np.mean([len({h.id for h in row} & set(want)) / 10 for row, want in zip(narrow, exact)]) < 0.95
    top = hits[0][0]
    assert top.score == pytest.approx(float(queries[0] @ data[top.id]), abs=1e-5)  # cosine, as usearch


def test_ids_labels_and_model_round_trip(tmp_path: Path) -> None:
    uri = f"milvus-lite://{tmp_path}/v.db?collection=ids"
    v = _unit(4, 16, 2)
    hostile = 'quote " backslash \\ newline \n tab \t café ✓'
    ids = [0, 2**63 - 1, 2**63, 2**64 - 2]  # the signed-key edges map to the same 64 bits and back
    idx = open_index(uri, 16, model="clip:abc")
    idx.add(ids, v * 7.0, labels=["zero", hostile, "", "last"])  # scaled: stored normalised
    with pytest.raises(InvalidInputError, match="already in the index: \\[9223372036854775808\\]"):
        idx.add([2**63], v[:1])
    idx.add([5], v[:1])  # no label
    assert len(idx) == 5 and 2**63 in idx and 2**64 - 2 in idx and 6 not in idx and -1 not in idx
    assert idx.find_labels([hostile, "", "missing"]) == {hostile: 2**63 - 1, "": 2**63}
    got = {h.id: (h.label, round(h.score, 5)) for h in idx.search(v, k=5)[0]}
    assert got[2**63 - 1] == (hostile, round(float(v[0] @ v[1]), 5)) and got[5] == (None, 1.0)
    assert [h.id for h in idx.search(v[3], k=1)[0]] == [2**64 - 2]
    assert idx.remove([2**63, 2**64 - 2, 2**64 - 1, 77]) == 2 and len(idx) == 3
    with pytest.raises(InvalidInputError, match="at most 16384"):
        idx.search(v[0], k=20000)
    idx.close()
    back = open_index(uri, 16)  # the dimension and model come from the collection
    assert (back.dim, back.model, len(back)) == (16, "clip:abc", 3)


def test_refuses_collections_it_did_not_make(tmp_path: Path) -> None:
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp_path / "v.db"))
    client.create_collection("theirs", dimension=8)  # pymilvus's quick setup: no mmedge property
    client.close()
    with pytest.raises(IntegrityError, match="not an mmedge index"):
        open_index(f"milvus-lite://{tmp_path}/v.db?collection=theirs", 8)
    with pytest.raises(InvalidInputError, match="does not exist"):
        open_index(f"milvus-lite://{tmp_path}/v.db?collection=other", 8, create=False)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    for i, s in enumerate(generate_scenes(6, seed=3)):
        cv2.imwrite(str(folder / f"{i}.png"), s.image[:, :, ::-1])
    return folder


def test_pipeline_adds_searches_and_removes_through_milvus(
    tiny_pkg_session: Path, scenes: Path, tmp_path: Path
) -> None:
    uri = f"milvus-lite://{tmp_path}/photos.db?collection=photos"
    files = sorted(str(p) for p in scenes.iterdir())
    p = sdk.Pipeline(tiny_pkg_session, index=uri)
    assert isinstance(p.index, MilvusIndex) and p.index.model == p.model_id
    assert p.add_images(files, labels=files) == list(range(6))
    by_image = p.search(Path(files[2]), k=3)
    assert by_image[0].label == files[2] and by_image[0].score == pytest.approx(1.0, abs=1e-4)
    text = p.search("a red circle", k=6)
    exact = p.embed_images(files) @ p.embed_texts(["a red circle"])[0]  # the same ranking, exactly
    assert [h.id for h in text] == list(np.argsort(-exact)) and text[0].score == pytest.approx(
        exact.max(), abs=1e-5
    )
    assert p.index.remove([2]) == 1
    assert all(h.id != 2 for h in p.search(Path(files[2]), k=6))
    p.index.close()

    q = sdk.Pipeline(tiny_pkg_session, index=uri)  # persisted: reopened with 5 entries
    assert len(q.index) == 5 and q.add_images([files[2]]) == [6]  # len() is taken by id 5: the next free id
    q.index.close()


def test_cli_search_round_trips_through_milvus(
    tiny_pkg_session: Path, scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    uri = f"milvus-lite://{tmp_path}/cli.db?collection=cli"

    def run(*argv: str) -> dict:
        assert main(["search", str(tiny_pkg_session), "--index", uri, "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    assert main(["search", str(tiny_pkg_session), "--index", uri, "a red circle"]) == 1
    assert "does not exist" in capsys.readouterr().err  # searching alone never creates an index
    assert run("--add", str(scenes)) == {"added": 6, "already_indexed": 0, "indexed": 6}
    assert run("--add", str(scenes))["already_indexed"] == 6  # labels found in Milvus: no duplicates
    hit = run("--image", str(scenes / "4.png"), "-k", "1")["hits"][0]
    assert hit["label"].endswith("4.png") and hit["score"] == pytest.approx(1.0, abs=1e-3)
    assert run("--remove", f"{hit['id']},99") == {"removed": 1, "indexed": 5}
    assert all(h["id"] != hit["id"] for h in run("--image", str(scenes / "4.png"), "-k", "5")["hits"])


def test_a_server_that_is_not_there_is_a_typed_error() -> None:
    from mmedge.errors import IndexServiceError

    with pytest.raises(IndexServiceError, match=r"127\.0\.0\.1:9 .*cannot connect"):
        open_index("milvus://127.0.0.1:9/photos", 8)
