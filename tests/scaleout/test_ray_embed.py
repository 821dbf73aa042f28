"""`mmedge embed --ray`: Ray Data embeds an image folder or JSONL into Parquet, equal to one process."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import cv2
import numpy as np
import pytest

from mmedge import sdk
from mmedge.data import generate_scenes
from mmedge.errors import IntegrityError, InvalidInputError, MmedgeError, ModelNotFoundError, UnsupportedError
from mmedge.sdk import cli
from mmedge.sdk.ray_cluster import PackageRef, manifest_digest

pytestmark = pytest.mark.ray


def write_scenes(folder: Path, n: int, seed: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(generate_scenes(n, seed=seed, image_size=48)):
        path = folder / f"scene_{i:04d}.png"
        assert cv2.imwrite(str(path), scene.image[:, :, ::-1])
        paths.append(str(path))
    return paths


def test_500_images_on_ray_equal_one_process(
    ray_instance: str, tiny_pkg_session: Path, tmp_path: Path
) -> None:
    from mmedge.sdk.ray_embed import embed_to_parquet, read_embeddings

    paths = write_scenes(tmp_path / "images", 500)
    written = embed_to_parquet(
        tiny_pkg_session, tmp_path / "images", tmp_path / "out", actors=2, batch_size=64
    )
    assert written.images == 500 and written.files >= 1

    ids, got_paths, vectors = read_embeddings(tmp_path / "out")
    reference = sdk.Pipeline(tiny_pkg_session, threads=1).embed_images(paths)
    assert ids.tolist() == list(range(500))
    assert got_paths == paths  # absolute, in the folder's name order
    assert vectors.shape == reference.shape == (500, written.dim)
    np.testing.assert_allclose(vectors, reference, rtol=0, atol=1e-6)


def test_parquet_is_plain_columns_any_reader_takes(
    ray_instance: str, tiny_pkg_session: Path, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmedge.sdk.ray_embed import embed_to_parquet

    write_scenes(tmp_path / "images", 5)
    written = embed_to_parquet(
        tiny_pkg_session, tmp_path / "images", tmp_path / "out", actors=1, batch_size=2
    )
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("path").type == pa.string()
    assert table.schema.field("vector").type == pa.list_(pa.float32(), written.dim)
    assert sorted(table.column("id").to_pylist()) == [0, 1, 2, 3, 4]


def test_cli_embeds_a_jsonl_in_line_order_and_replaces_its_own_output(
    ray_instance: str, tiny_pkg_session: Path, tmp_path: Path
) -> None:
    from mmedge.sdk.ray_embed import read_embeddings

    paths = write_scenes(tmp_path / "data" / "img", 6)
    order = [4, 0, 5, 2]  # line order, not name order; paths relative to the JSONL file
    jsonl = tmp_path / "data" / "captions.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"image": f"img/{Path(paths[i]).name}", "text": "x"}) + "\n" for i in order)
    )
    out = tmp_path / "vectors"
    for _ in range(2):  # the second run replaces the first one's files
        buf = io.StringIO()
        with redirect_stdout(buf):
            code = cli.main(
                [
                    "embed",
                    str(tiny_pkg_session),
                    "--ray",
                    str(jsonl),
                    "--out",
                    str(out),
                    "--actors",
                    "1",
                    "--batch-size",
                    "3",
                    "--json",
                ]
            )
        assert code == 0, buf.getvalue()
        assert json.loads(buf.getvalue())["images"] == 4
    ids, got, vectors = read_embeddings(out)
    assert ids.tolist() == [0, 1, 2, 3] and got == [paths[i] for i in order]
    np.testing.assert_allclose(vectors, sdk.Pipeline(tiny_pkg_session).embed_images(got), atol=1e-6)
    assert len(list(out.glob("*.parquet"))) == 1


def test_an_unreadable_image_fails_with_its_name_and_writes_nothing(
    ray_instance: str, tiny_pkg_session: Path, tmp_path: Path
) -> None:
    from mmedge.sdk.ray_embed import embed_to_parquet

    write_scenes(tmp_path / "images", 3)
    (tmp_path / "images" / "scene_0001.png").write_bytes(b"not an image")
    with pytest.raises(InvalidInputError, match=r"scene_0001\.png.*unknown format") as err:
        embed_to_parquet(tiny_pkg_session, tmp_path / "images", tmp_path / "out", actors=1, batch_size=2)
    assert "Failed to apply UDF" not in str(err.value)  # the node's own message, not Ray's wrapper
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".mmedge-staging-*"))


def test_refusals_before_any_ray_work(
    tiny_pkg_session: Path, tiny_chat_pkg_session: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from mmedge.sdk.ray_embed import embed_to_parquet

    write_scenes(tmp_path / "images", 2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="holds files that are not"):
        embed_to_parquet(tiny_pkg_session, tmp_path / "images", mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(UnsupportedError, match="chat package"):
        embed_to_parquet(tiny_chat_pkg_session, tmp_path / "images", tmp_path / "out")
    with pytest.raises(InvalidInputError, match="not shapes:N"):
        embed_to_parquet(tiny_pkg_session, "shapes:4", tmp_path / "out")
    with pytest.raises(InvalidInputError, match="batch_size"):
        embed_to_parquet(tiny_pkg_session, tmp_path / "images", tmp_path / "out", batch_size=0)


def test_ray_options_need_ray(tiny_pkg_session: Path, tmp_path: Path) -> None:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = cli.main(["embed", str(tiny_pkg_session), "x.png", "--actors", "2", "--json"])
    assert code != 0 and "--actors apply with --ray only" in buf.getvalue()


def test_a_node_copy_that_differs_from_the_drivers_is_refused(tiny_pkg: Path) -> None:
    """What every actor and replica checks after verifying its own copy."""
    ref = PackageRef.of(tiny_pkg)
    assert ref.location == str(tiny_pkg.resolve()) and ref.task == "retrieval"
    assert ref.digest == manifest_digest(sdk.Pipeline(tiny_pkg).runner.manifest)
    ref.open("ort", "auto", 1)  # the same copy opens

    other = dataclasses.replace(ref, digest="0" * 64)  # as if the node held another version
    with pytest.raises(IntegrityError, match="not the one the driver verified"):
        other.open("ort", "auto", 1)
    with pytest.raises(MmedgeError, match="runs mmedge"):
        dataclasses.replace(ref, version="0.0.0").open("ort", "auto", 1)


def test_an_actor_that_cannot_open_the_package_fails_its_first_batch(tiny_pkg: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="the ray extra is not installed")
    from mmedge.sdk.ray_embed import _Embedder

    ref = PackageRef.of(tiny_pkg)
    shutil.rmtree(tiny_pkg)  # gone from this node after the driver checked it
    embedder = _Embedder(ref, "ort", "auto", 1)  # does not raise: Ray would only restart the actor
    with pytest.raises(ModelNotFoundError, match="no model package"):
        embedder({"id": np.array([0]), "path": np.array(["x.png"])})
