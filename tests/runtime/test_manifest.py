"""Strict manifest parsing: wrong types, unknown keys and unsafe paths are IntegrityErrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmedge.errors import IntegrityError
from mmedge.runtime.manifest import MANIFEST_NAME, check_relpath, parse_manifest


def _raw(pkg: Path) -> dict:
    return json.loads((pkg / MANIFEST_NAME).read_text())


def test_round_trip(tiny_pkg_session: Path) -> None:
    text = (tiny_pkg_session / MANIFEST_NAME).read_text()
    m = parse_manifest(text)
    assert m.to_json() == text
    assert set(m.components) == {"vision", "text"}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(extra=1), "unknown keys"),
        (lambda r: r.update(schema="mmedge.package/99"), "schema"),
        (lambda r: r.update(task="dance"), "task"),
        (lambda r: r.pop("components"), "missing keys"),
        (lambda r: r["components"]["vision"]["dims"]["batch"].update(min=0), "min <= opt"),
        (lambda r: r["components"]["vision"]["dims"]["batch"].update(max="64"), "expected"),
        (lambda r: r["components"]["vision"]["inputs"][0].update(dtype="complex128"), "dtype"),
        (
            lambda r: r["components"]["vision"]["precisions"]["fp32"].update(file="../evil.onnx"),
            "inside the package",
        ),
        (
            lambda r: r["components"]["vision"]["precisions"]["fp32"].update(file="/etc/passwd"),
            "inside the package",
        ),
        (
            lambda r: r["components"]["vision"]["precisions"]["fp32"].update(file="onnx/unlisted.onnx"),
            "does not list",
        ),
        (lambda r: r["files"].update({"x.bin": {"sha256": "zz", "size": 1}}), "sha256"),
        (lambda r: r["files"].update({"x.bin": {"sha256": "0" * 64, "size": True}}), "bool"),
        (lambda r: r["files"].update({"x.bin": {"sha256": "0" * 64, "size": -1}}), "negative"),
        (lambda r: r.update(name="bad name with spaces"), "valid name"),
    ],
)
def test_rejects(tiny_pkg_session: Path, mutate, message: str) -> None:
    raw = _raw(tiny_pkg_session)
    mutate(raw)
    with pytest.raises(IntegrityError, match=message):
        parse_manifest(json.dumps(raw))


@pytest.mark.parametrize("text", ["", "{", "[]", "null", "1e999999", '{"schema": ' * 10000])
def test_rejects_garbage(text: str) -> None:
    with pytest.raises(IntegrityError):
        parse_manifest(text)


@pytest.mark.parametrize("path", ["a/../b", "./a", "a//b", "C:\\x", "a\x00b", "", "/abs"])
def test_relpath_rejects(path: str) -> None:
    with pytest.raises(IntegrityError):
        check_relpath(path)
