"""Helpers of the bad-input battery (`test_bad_input_battery.py`): what a row may touch, the builders
of bad packages, files and inputs, and `case`, which makes a row."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mmedge.errors import (
    MmedgeError,
)

CASE_TIMEOUT_S = 60  # per row; a healthy row takes milliseconds
CHILD_TIMEOUT_S = 180


# --- what a row may touch ---------------------------------------------------------------------


class Env:
    """Per-row scratch space: private copies of the package and checkpoint, and a shared pipeline."""

    def __init__(
        self,
        tmp: Path,
        pkg_src: Path,
        ckpt_src: Path,
        pipe_factory: Callable[[], object],
        store: Path | None = None,
    ) -> None:
        self.tmp, self._pkg_src, self._ckpt_src, self._pipe_factory = tmp, pkg_src, ckpt_src, pipe_factory
        self.store = store
        self._pkg: Path | None = None
        self._ckpt: Path | None = None

    def pkg(self) -> Path:
        """A private copy of the exported clip-tiny package, safe to corrupt."""
        if self._pkg is None:
            self._pkg = self.tmp / "clip-tiny"
            shutil.copytree(self._pkg_src, self._pkg)
        return self._pkg

    def ckpt(self) -> Path:
        """A private copy of the clip-tiny checkpoint, safe to corrupt."""
        if self._ckpt is None:
            self._ckpt = self.tmp / "clip-tiny-ckpt"
            shutil.copytree(self._ckpt_src, self._ckpt)
        return self._ckpt

    @property
    def pipe(self):
        return self._pipe_factory()


# --- builders of bad things -------------------------------------------------------------------


def _open(root: Path) -> object:
    """Open and load everything: files are checked as their components load, before any runtime
    sees them (a package's own open checks only the manifest and file metadata)."""
    from mmedge import sdk

    return sdk.Pipeline(str(root), preload=True)


def _verify(root: Path) -> object:
    """Full verification (`mmedge verify`): every listed file, used or not. Opening checks a file
    only when a component loads it; an extra ONNX file no component uses is never read."""
    from mmedge.runtime.package import verify_package

    return verify_package(root)


def _edit_manifest(root: Path, mutate: Callable[[dict], object]) -> Path:
    raw = json.loads((root / "manifest.json").read_text())
    mutate(raw)
    (root / "manifest.json").write_text(json.dumps(raw))
    return root


def _relist(root: Path, *rels: str) -> Path:
    """Record the current size and sha256 of files in the manifest, as an attacker re-signing would."""
    from mmedge.runtime.package import sha256_file

    def mutate(raw: dict) -> None:
        for rel in rels:
            raw["files"][rel] = {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}

    return _edit_manifest(root, mutate)


def _rewrite_onnx(root: Path, rel: str, mutate: Callable[[object], object]) -> Path:
    import onnx

    model = onnx.load(str(root / rel))
    mutate(model)
    onnx.save(model, str(root / rel))
    return _relist(root, rel)


def _set_opset(model, version: int) -> None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = version


def _external(
    env: Env,
    location: str = "ext.bin",
    offset: str = "0",
    length: str = "64",
    extra: dict[str, str] | None = None,
    in_attribute: bool = False,
    symlink: bool = False,
) -> Path:
    """Add a listed onnx/ext.onnx whose tensor `w` keeps its 64 bytes in external data at `location`."""
    import onnx
    from onnx import TensorProto, helper

    root = env.pkg()
    data = np.arange(16, dtype=np.float32).tobytes()
    if symlink:
        (env.tmp / "outside.bin").write_bytes(data)
        os.symlink(env.tmp / "outside.bin", root / "onnx" / "ext.bin")
    else:
        (root / "onnx" / "ext.bin").write_bytes(data)
    w = TensorProto()
    w.name, w.data_type, w.data_location = "w", TensorProto.FLOAT, TensorProto.EXTERNAL
    w.dims.extend([16])
    for key, value in {"location": location, "offset": offset, "length": length, **(extra or {})}.items():
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])
    if in_attribute:  # a Constant node's tensor attribute, not an initializer
        graph = helper.make_graph([helper.make_node("Constant", [], ["y"], value=w)], "g", [], [out])
    else:
        graph = helper.make_graph(
            [helper.make_node("Identity", ["w"], ["y"])], "g", [], [out], initializer=[w]
        )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(root / "onnx" / "ext.onnx"))
    return _relist(root, "onnx/ext.onnx", "onnx/ext.bin")


def _replace_with_symlink(env: Env, rel: str) -> Path:
    """Move a listed file (or directory) out of the package and leave a symlink to it behind."""
    root = env.pkg()
    outside = env.tmp / ("outside-" + rel.replace("/", "_"))
    shutil.move(root / rel, outside)
    os.symlink(outside, root / rel)
    return root


def _ckpt_tensors(env: Env, mutate: Callable[[dict], object]) -> Path:
    from safetensors.torch import load_file, save_file

    root = env.ckpt()
    tensors = load_file(str(root / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(root / "model.safetensors"))
    return root


def _ckpt_config(env: Env, mutate: Callable[[dict], object]) -> Path:
    root = env.ckpt()
    meta = json.loads((root / "config.json").read_text())
    mutate(meta)
    (root / "config.json").write_text(json.dumps(meta))
    return root


def _load_ckpt(root: Path) -> object:
    from mmedge.models.sources import load_source

    return load_source(root)


class _GetPid:
    """Pickles as a call to os.getpid: a harmless stand-in for a payload that runs code on load."""

    def __reduce__(self):
        return (os.getpid, ())


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _ihdr(width: int, height: int) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def _png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR declares width x height, with a tiny IDAT."""
    return (
        _PNG_SIG + _ihdr(width, height) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b"")
    )


def _encode(ext: str, shape: tuple[int, ...] = (32, 32, 3)) -> bytes:
    """A real image file of seeded noise (so the compressed pixel data is hundreds of bytes long)."""
    import cv2

    ok, buf = cv2.imencode(ext, np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is patched to claim width x height."""
    data = bytearray(_encode(".jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _webp_vp8x(width: int, height: int) -> bytes:
    body = (
        b"VP8X"
        + struct.pack("<I", 10)
        + b"\x00\x00\x00\x00"
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
    )
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _bmp_declaring(width: int, height: int) -> bytes:
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(dib), 0, 0, 14 + len(dib)) + dib


_GIF_1X1 = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


def _load_image(src: object, **limits: object) -> object:
    from mmedge.runtime.images import ImageLimits, load_image

    return load_image(src, limits=ImageLimits(**limits))


def _write(env: Env, name: str, data: bytes) -> str:
    path = env.tmp / name
    path.write_bytes(data)
    return str(path)


def _fifo(env: Env) -> str:
    path = env.tmp / "pipe.png"
    os.mkfifo(path)  # opening it for reading would block forever: it must never be opened
    return str(path)


def _text_feeds(ids: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64) if mask is None else mask}


def _store_with_package(env: Env) -> None:
    assert env.store is not None, "this row needs the `store` fixture"
    shutil.copytree(env.pkg(), env.store / "clip-tiny")


def _tokenizer_from_json(text: str) -> object:
    from mmedge.runtime.texts import TextTokenizer

    return TextTokenizer.from_json(text, context_length=32, pad_id=0)


def _index_dir(env: Env, tamper: Callable[[Path], object]) -> object:
    from mmedge.runtime.index import VectorIndex

    idx = VectorIndex(4)
    idx.add([0, 1], np.eye(2, 4, dtype=np.float32))
    idx.save(env.tmp / "idx")
    tamper(env.tmp / "idx")
    return VectorIndex.load(env.tmp / "idx")


# --- the table ----------------------------------------------------------------------------------

IMG = np.full((32, 32, 3), 128, np.uint8)
NATIVE: list[str] = []  # ids of rows that drive native parsers; they also run in a child process


def case(
    id: str,
    exc: type[MmedgeError],
    match: str,
    run: Callable[[Env], object],
    *,
    native: bool = False,
    xfail: str | None = None,
) -> object:
    if native:
        NATIVE.append(id)
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(run, exc, match, id=id, marks=marks)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _append(path: Path, extra: bytes) -> None:
    with open(path, "ab") as f:
        f.write(extra)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _with(arr: np.ndarray, where: tuple[int, ...], value: float) -> np.ndarray:
    arr[where] = value
    return arr


def _zeros(*shape: int, dtype: str = "float32") -> object:
    import torch

    return torch.zeros(shape, dtype=getattr(torch, dtype))


def _torch_save(env: Env, name: str, obj: object) -> Path:
    import torch

    torch.save(obj, env.tmp / name)
    return env.tmp / name


def _load_weights(path: Path, allow_pickle: bool = False) -> object:
    from mmedge.models.checkpoint import load_weights

    return load_weights(path, allow_pickle=allow_pickle)


def _hf_dir_with_pickle(env: Env) -> Path:
    root = env.tmp / "hf-clip"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "clip"}))
    _torch_save(env, "hf-clip/pytorch_model.bin", {"w": _zeros()})
    return root


def _tokenizer_from_file(env: Env, context_length: int) -> object:
    from mmedge.runtime.texts import TextTokenizer

    return TextTokenizer.from_file(env.pkg() / "tokenizer.json", context_length=context_length)


def _pipeline(env: Env, **kwargs: object) -> object:
    from mmedge import sdk

    return sdk.Pipeline(str(env._pkg_src), **kwargs)  # read-only use: no private copy needed


def _open_name(name: str) -> object:
    from mmedge import sdk

    return sdk.Pipeline(name)
