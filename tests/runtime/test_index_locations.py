"""Index locations: a usearch directory or a Milvus URI, parsed and refused without any Milvus client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmedge.errors import InvalidInputError
from mmedge.runtime.index import VectorIndex
from mmedge.runtime.indexes import MilvusLocation, open_index, parse_location


def test_plain_paths_are_usearch_directories(tmp_path: Path) -> None:
    assert parse_location(str(tmp_path / "idx")) == tmp_path / "idx"
    assert parse_location(tmp_path / "a:b") == tmp_path / "a:b"  # a path object is never a URI


def test_milvus_lite_locations(tmp_path: Path) -> None:
    where = parse_location(f"milvus-lite://{tmp_path}/v.db?collection=photos")
    assert where == MilvusLocation(str(tmp_path / "v.db"), "photos", lite=True)
    rel = parse_location("milvus-lite://data/v.db")
    assert isinstance(rel, MilvusLocation)
    assert rel.uri == str(Path("data/v.db").absolute()) and rel.collection == "mmedge"


@pytest.mark.parametrize(
    ("uri", "server", "collection", "db"),
    [
        ("milvus://milvus.local/photos", "http://milvus.local:19530", "photos", None),
        ("milvus://10.0.0.5:29530/photos?db=fleet", "http://10.0.0.5:29530", "photos", "fleet"),
        ("milvus+tls://in01.zillizcloud.com:443/photos", "https://in01.zillizcloud.com:443", "photos", None),
        ("milvus://[::1]:19531", "http://[::1]:19531", "mmedge", None),
    ],
)
def test_server_locations(uri: str, server: str, collection: str, db: str | None) -> None:
    assert parse_location(uri) == MilvusLocation(server, collection, db=db)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("milvus-lit:///x.db", "scheme 'milvus-lit' is not known"),
        ("s3://bucket/idx", "scheme 's3' is not known"),
        ("milvus-lite:///tmp/x.sqlite", "ends in .db"),
        ("milvus-lite:///tmp/x.db?collection=9lives", "collection name '9lives' is not valid"),
        ("milvus-lite:///tmp/x.db?collection=a;drop", "is not valid"),
        ("milvus-lite:///tmp/x.db?colection=a", "unknown parameter"),
        ("milvus://user:secret@host/photos", "MMEDGE_MILVUS_TOKEN"),
        ("milvus://host:99999/photos", "Port out of range"),
        ("milvus:///photos", "names no host"),
        ("milvus://host/photos?db=a-b", "database name"),
        ("milvus://host/a/b", "collection name 'a/b'"),
        ("", "non-empty"),
    ],
)
def test_bad_locations_are_refused_by_name(uri: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_location(uri)


def test_usearch_location_is_created_on_save_and_loaded_back(tmp_path: Path) -> None:
    where = tmp_path / "idx"
    with pytest.raises(InvalidInputError, match="does not exist"):
        open_index(where, 8, create=False)
    idx = open_index(str(where), 8, model="m")
    assert isinstance(idx, VectorIndex) and not where.exists()
    idx.add([5, 2**64 - 2], np.eye(8, dtype=np.float32)[:2], labels=["five", "big"])
    idx.save()
    back = open_index(str(where), 8, create=False)
    assert isinstance(back, VectorIndex) and back.model == "m"
    assert back.find_labels(["big", "five", "none"]) == {"five": 5, "big": 2**64 - 2}
    assert [h.id for h in back.search(np.eye(8, dtype=np.float32)[1], 1)[0]] == [2**64 - 2]


def test_in_memory_usearch_index_needs_a_path_to_save() -> None:
    with pytest.raises(InvalidInputError, match="save\\(path\\)"):
        VectorIndex(4).save()
