"""Bad input at the pipeline boundary: each raises a typed mmedge error naming the problem."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from mmedge import sdk
from mmedge.errors import InvalidInputError


@pytest.fixture(scope="module")
def pipe(tiny_pkg_session: Path):
    return sdk.Pipeline(str(tiny_pkg_session))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) declares width x height, with a tiny IDAT and IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_empty_image_file(pipe, tmp_path: Path) -> None:
    f = tmp_path / "empty.png"
    f.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="empty"):
        pipe.embed_images([str(f)])


def test_corrupt_image_file(pipe, tmp_path: Path) -> None:
    import cv2

    _ok, buf = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))
    f = tmp_path / "corrupt.png"
    f.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(InvalidInputError):
        pipe.embed_images([str(f)])


def test_unsupported_file_type(pipe, tmp_path: Path) -> None:
    f = tmp_path / "doc.pdf"
    f.write_bytes(b"%PDF-1.4\n" + b"x" * 100)
    with pytest.raises(InvalidInputError, match="format"):
        pipe.embed_images([str(f)])


def test_huge_image_rejected_from_header(pipe, tmp_path: Path) -> None:
    f = tmp_path / "huge.png"
    f.write_bytes(_png_header(20000, 20000))
    with pytest.raises(InvalidInputError, match="20000x20000"):
        pipe.embed_images([str(f)])


def test_empty_text(pipe) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        pipe.embed_texts([""])
    with pytest.raises(InvalidInputError, match="empty"):
        pipe.embed_texts(["   "])


def test_megabyte_text(pipe) -> None:
    with pytest.raises(InvalidInputError, match="10000"):
        pipe.embed_texts(["a" * (1 << 20)])


def test_nan_array(pipe) -> None:
    a = np.full((64, 64, 3), 0.5, np.float32)
    a[3, 3, 1] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        pipe.embed_images([a])


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 10, 3), np.uint8),
        np.zeros((8, 8, 3), np.int32),
        np.zeros((2, 8, 8, 3, 1), np.uint8),
        "no/such/file.png",
    ],
)
def test_bad_arrays_and_paths(pipe, bad) -> None:
    with pytest.raises(InvalidInputError):
        pipe.embed_images([bad])


def test_non_string_text(pipe) -> None:
    with pytest.raises(InvalidInputError):
        pipe.embed_texts([b"bytes are not text"])
