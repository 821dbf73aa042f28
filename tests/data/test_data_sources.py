"""`--data` specs: synthetic scenes, image folders and JSONL caption files, and their errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mmedge.data import HELD_OUT_SEED, DataItem, generate_scenes, load_data
from mmedge.errors import InvalidInputError


def test_shapes_spec_gives_held_out_scenes() -> None:
    items = load_data("shapes:12")
    scenes = generate_scenes(12, HELD_OUT_SEED)
    assert len(items) == 12 and all(isinstance(i, DataItem) for i in items)
    for item, scene in zip(items, scenes):
        assert item.text == scene.caption and item.key == scene.key
        np.testing.assert_array_equal(item.image, scene.image)
    assert len(load_data("shapes:12", limit=5)) == 5
    assert load_data("shapes:3", image_size=32)[0].image.shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("shapes:abc", "whole number"),
        ("shapes:", "whole number"),
        ("shapes:-3", "whole number"),
        ("shapes:0", "between 1 and"),
        ("shapes:1000001", "between 1 and"),
        ("", "non-empty"),
        ("/no/such/place", "does not exist"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load_data(spec)


def test_bad_limit() -> None:
    with pytest.raises(InvalidInputError, match="limit"):
        load_data("shapes:3", limit=0)


def test_folder_lists_images_sorted_not_recursive(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.webp", "d.bmp", "e.jpeg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.png").write_bytes(b"x")
    items = load_data(str(tmp_path))
    assert [os.path.basename(str(i.image)) for i in items] == ["a.JPG", "b.png", "c.webp", "d.bmp", "e.jpeg"]
    assert all(i.text is None and i.key == i.image and os.path.isabs(str(i.image)) for i in items)
    assert len(load_data(str(tmp_path), limit=2)) == 2


def test_folder_without_images(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no image files"):
        load_data(str(tmp_path))
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(InvalidInputError, match=r"\.png"):
        load_data(str(tmp_path))


def test_jsonl_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "one.png").write_bytes(b"x")
    absolute = tmp_path / "two.jpg"
    absolute.write_bytes(b"x")
    lines = [
        {"image": "img/one.png", "text": "a red circle"},
        {"image": str(absolute), "text": "a blue star"},
        {"image": "img/one.png", "text": "another caption of the same image"},
    ]
    file = tmp_path / "caps.jsonl"
    file.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = load_data(str(file))
    assert [i.text for i in items] == [x["text"] for x in lines]
    assert items[0].image == str(tmp_path / "img" / "one.png") and items[1].image == str(absolute)
    assert items[0].key == items[2].key != items[1].key
    assert len(load_data(str(file), limit=1)) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2 is not valid JSON"),
        ("[1, 2]", "line 2 must be a JSON object"),
        ('{"image": "a.png"}', "line 2 is missing key.*text"),
        ('{"text": "x"}', "line 2 is missing key.*image"),
        ('{"image": 3, "text": "x"}', "line 2: 'image' must be"),
        ('{"image": "a.png", "text": null}', "line 2: 'text' must be a string"),
        ('{"image": "gone.png", "text": "x"}', "line 2: image file .* does not exist"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    file = tmp_path / "caps.jsonl"
    file.write_text('{"image": "a.png", "text": "ok"}\n' + line + "\n")
    with pytest.raises(InvalidInputError, match=message):
        load_data(str(file))


def test_empty_jsonl_and_other_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InvalidInputError, match="no records"):
        load_data(str(empty))
    other = tmp_path / "caps.json"
    other.write_text("[]")
    with pytest.raises(InvalidInputError, match=r"neither a directory nor a \.jsonl"):
        load_data(str(other))
