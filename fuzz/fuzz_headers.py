"""Fuzz targets of the tokenizer.json policy and of the PNG/JPEG header readers, with their seeds
(`fuzz_entry_points.py` loads this file beside it and registers them as `tokenizer_json` and
`image_header`). mmedge is imported inside the functions only, so that the harness imports it under
atheris' instrumentation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def check_tokenizer_json(data: bytes) -> None:
    """Fuzzer bytes as a tokenizer.json: refused with an MmedgeError, or loaded and usable."""
    from mmedge.errors import MmedgeError
    from mmedge.runtime.texts import TextTokenizer

    try:
        tok = TextTokenizer.from_bytes(data, context_length=16, pad_id=0)
        ids, mask = tok.encode_batch(["a red circle", "x" * 200])
    except MmedgeError:
        return
    assert ids.shape == mask.shape and ids.shape[0] == 2 and ids.shape[1] <= 16, ids.shape


def check_image_header(data: bytes) -> None:
    """Fuzzer bytes through the PNG/JPEG header readers (after a b"P"/b"J" selector): a HeaderError,
    or a header whose numbers are sane (the caps in images.py rely on them)."""
    from mmedge.runtime.image_headers import HeaderError, read_header

    fmt = {b"P": "png", b"J": "jpeg"}.get(data[:1], "png" if data[1:2] == b"\x89" else "jpeg")
    body = data[1:] if data[:1] in (b"P", b"J") else data
    try:
        header = read_header(body, fmt)
    except HeaderError:
        return
    assert header.format == fmt and header.width >= 0 and header.height >= 0, header
    assert 1 <= header.bytes_per_pixel <= 1020 and header.scans >= 1 and 1 <= header.orientation <= 8, header
    assert header.decoded_bytes == header.width * header.height * header.bytes_per_pixel, header


def hostile_tokenizer_seeds(package: Path | None) -> list[bytes]:
    import base64

    base: dict[str, Any] = {
        "version": "1.0",
        "added_tokens": [],
        "model": {"type": "WordLevel", "vocab": {"<pad>": 0, "a": 1, "[UNK]": 2}, "unk_token": "[UNK]"},
        "pre_tokenizer": {"type": "Whitespace"},
    }
    charsmap = base64.b64encode(b"\xff\xff\xff\x00" + b"\x01" * 64).decode()
    variants = [
        {},
        {"normalizer": {"type": "Precompiled", "precompiled_charsmap": charsmap}},
        {"normalizer": {"type": "Replace", "pattern": {"String": "a"}, "content": "b" * 16}},
        {
            "pre_tokenizer": {
                "type": "Split",
                "pattern": {"Regex": "(a+)+$"},
                "behavior": "Isolated",
                "invert": False,
            }
        },
        {
            "pre_tokenizer": {
                "type": "Split",
                "pattern": {"Regex": "\\s+"},
                "behavior": "Removed",
                "invert": False,
            }
        },
    ]
    out = [json.dumps({**base, **v}).encode() for v in variants] + [b"{", b"[]", b'{"model": 1}']
    if package is not None:
        out.append((package / "tokenizer.json").read_bytes())
    return out


def image_header_seeds() -> list[bytes]:
    import cv2
    import numpy as np

    img = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    png = cv2.imencode(".png", img)[1].tobytes()
    png16 = cv2.imencode(".png", np.zeros((6, 5, 4), np.uint16))[1].tobytes()
    jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    first, end = jpg.index(b"\xff\xda"), jpg.rindex(b"\xff\xd9")
    scans = jpg[:first] + jpg[first:end] * 8 + jpg[end:]  # 80 scans
    return [b"P" + png, b"P" + png16, b"J" + jpg, b"J" + scans, b"J" + jpg[: first + 4], b"P" + png[:40]]
