"""Bad-input battery: every hostile input raises the documented `mmedge.errors` class naming the problem.

One table (`CASES`) of bad inputs across packages, ONNX files and their external data, checkpoints,
images, texts, arrays at the component boundary and request parameters. Each row states the exact
exception class and a `match=` pattern that names the problem or the limit.

Crashes and hangs: every row runs under a faulthandler watchdog (`CASE_TIMEOUT_S`): a hang dumps every
thread's stack and ends the run with the row still named in the output, rather than stalling CI. The rows
that drive native parsers (image decoders, protobuf, the Rust tokenizer and safetensors readers) run a
second time in one child process (`test_native_rows_in_child_process`), so a segfault or abort there
fails one test with the row's id instead of killing pytest. The whole table can also run on its own,
in a fresh process, with a timeout:

    timeout 300 .venv/bin/python tests/security/test_bad_input_battery.py        # builds its own package
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from mmedge.errors import (
    ConfigError,
    IntegrityError,
    InvalidInputError,
    MmedgeError,
    ModelNotFoundError,
    UnsupportedError,
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


CASES = [
    # --- package and manifest: verified on load, before any runtime sees a file ---------------------
    case(
        "manifest-unknown-key",
        IntegrityError,
        r"manifest: unknown keys \['surprise'\]",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r.update(surprise=1))),
    ),
    case(
        "manifest-schema-1-says-re-export",
        IntegrityError,
        r"schema 'mmedge.package/1' is not supported.*re-export",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r.update(schema="mmedge.package/1"))),
    ),
    case(
        "manifest-unknown-role",
        IntegrityError,
        r"role 'denoiser' is not one this runtime knows",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r["components"]["vision"].update(role="denoiser"))),
    ),
    case(
        "manifest-path-names-a-missing-component",
        IntegrityError,
        r"pipeline.paths.image.steps\[0\] names component 'ghost'",
        lambda e: _open(
            _edit_manifest(
                e.pkg(), lambda r: r["pipeline"]["paths"]["image"]["steps"][0].update(component="ghost")
            )
        ),
    ),
    case(
        "manifest-path-reads-an-unproduced-value",
        IntegrityError,
        r"reads values \['elsewhere'\] that no earlier step produces",
        lambda e: _open(
            _edit_manifest(
                e.pkg(),
                lambda r: r["pipeline"]["paths"]["image"]["steps"][0].update(
                    inputs={"pixel_values": "elsewhere"}
                ),
            )
        ),
    ),
    case(
        "manifest-path-runs-a-component-of-another-role",
        IntegrityError,
        r"a 'text_encoder' component does not run on the 'image' path",
        lambda e: _open(
            _edit_manifest(
                e.pkg(),
                lambda r: r["pipeline"]["paths"]["image"]["steps"][0].update(
                    component="text",
                    inputs={"input_ids": "pixel_values", "attention_mask": "pixel_values"},
                    outputs={"text_embeds": "image_embeds"},
                ),
            )
        ),
    ),
    case(
        "manifest-task-section-missing",
        IntegrityError,
        r"a retrieval package needs a 'retrieval' section",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r.update(retrieval=None))),
    ),
    case(
        "manifest-section-wrong-type",
        IntegrityError,
        r"manifest.retrieval.logit_scale: expected a finite number",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r["retrieval"].update(logit_scale="100"))),
    ),
    case(
        "manifest-unknown-image-token-rule",
        IntegrityError,
        r"image_tokens.rule: 'grid' is not one of \['fixed', 'anyres'\]",
        lambda e: _open(
            _edit_manifest(e.pkg(), lambda r: r["pipeline"].update(image_tokens={"rule": "grid", "count": 4}))
        ),
    ),
    case(
        "manifest-unknown-nested-key",
        IntegrityError,
        r"inputs\[0\]: unknown keys \['layout'\]",
        lambda e: _open(
            _edit_manifest(e.pkg(), lambda r: r["components"]["vision"]["inputs"][0].update(layout="NCHW"))
        ),
    ),
    case(
        "manifest-wrong-type-size",
        IntegrityError,
        r"files\.tokenizer\.json\.size: expected .*int.*got str",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r["files"]["tokenizer.json"].update(size="3421"))),
    ),
    case(
        "manifest-wrong-type-dim",
        IntegrityError,
        r"dims\.batch\.max: expected .*int.*got str",
        lambda e: _open(
            _edit_manifest(e.pkg(), lambda r: r["components"]["vision"]["dims"]["batch"].update(max="64"))
        ),
    ),
    case(
        "manifest-not-json",
        IntegrityError,
        "manifest is not valid JSON",
        lambda e: (e.pkg().joinpath("manifest.json").write_text("{not json"), _open(e.pkg())),
    ),
    case(
        "manifest-over-4MiB",
        IntegrityError,
        r"manifest is \d+ bytes; the limit is 4194304",
        lambda e: (
            e.pkg().joinpath("manifest.json").write_bytes(b" " * (4 * 1024 * 1024 + 1)),
            _open(e.pkg()),
        ),
    ),
    case(
        "manifest-unknown-schema",
        IntegrityError,
        r"schema 'mmedge.package/3' is not supported",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r.update(schema="mmedge.package/3"))),
    ),
    case(
        "manifest-is-symlink",
        IntegrityError,
        r"has no manifest\.json \(or it is not a regular file\)",
        lambda e: _open(_replace_with_symlink(e, "manifest.json")),
    ),
    case(
        "pkg-listed-file-missing",
        IntegrityError,
        r"package file 'reports/parity\.json' is missing",
        lambda e: (e.pkg().joinpath("reports/parity.json").unlink(), _open(e.pkg())),
    ),
    case(
        "pkg-unlisted-file-referenced",
        IntegrityError,
        r"names 'onnx/extra\.onnx' but does not list its hash",
        lambda e: (
            shutil.copy(e.pkg() / "onnx/vision.onnx", e.pkg() / "onnx/extra.onnx"),
            _open(
                _edit_manifest(
                    e.pkg(),
                    lambda r: r["components"]["vision"]["precisions"]["fp32"].update(file="onnx/extra.onnx"),
                )
            ),
        ),
    ),
    case(
        "pkg-sha256-mismatch",
        IntegrityError,
        r"onnx/text\.onnx: sha256 differs from the manifest",
        lambda e: (_flip_last_byte(e.pkg() / "onnx/text.onnx"), _open(e.pkg())),
    ),
    case(
        "pkg-size-mismatch",
        IntegrityError,
        r"tokenizer\.json: size \d+ differs from the manifest's \d+",
        lambda e: (_append(e.pkg() / "tokenizer.json", b" "), _open(e.pkg())),
    ),
    case(
        "pkg-path-traversal",
        IntegrityError,
        r"'\.\./outside\.bin' must be relative and stay inside the package",
        lambda e: _open(
            _edit_manifest(
                e.pkg(), lambda r: r["files"].update({"../outside.bin": {"sha256": "0" * 64, "size": 1}})
            )
        ),
    ),
    case(
        "pkg-absolute-path",
        IntegrityError,
        r"tokenizer\.file '/etc/passwd' must be relative",
        lambda e: _open(_edit_manifest(e.pkg(), lambda r: r["tokenizer"].update(file="/etc/passwd"))),
    ),
    case(
        "pkg-backslash-path",
        IntegrityError,
        r"'onnx\\\\text\.onnx' is not a relative POSIX path",
        lambda e: _open(
            _edit_manifest(
                e.pkg(), lambda r: r["files"].update({"onnx\\text.onnx": r["files"].pop("onnx/text.onnx")})
            )
        ),
    ),
    case(
        "pkg-symlinked-file",
        IntegrityError,
        r"'tokenizer\.json' goes through a symlink; symlinks are refused",
        lambda e: _open(_replace_with_symlink(e, "tokenizer.json")),
    ),
    case(
        "pkg-symlinked-directory",
        IntegrityError,
        r"'onnx/text\.onnx' goes through a symlink",
        lambda e: _open(_replace_with_symlink(e, "onnx")),
    ),
    case(
        "pkg-hard-link",
        IntegrityError,
        r"'tokenizer\.json' has 2 hard links; hard links are refused",
        lambda e: (os.link(e.pkg() / "tokenizer.json", e.tmp / "alias.json"), _open(e.pkg())),
    ),
    case(
        "pkg-fifo-instead-of-file",
        IntegrityError,
        r"'reports/trt_lint\.json' is not a regular file",
        lambda e: (
            e.pkg().joinpath("reports/trt_lint.json").unlink(),
            os.mkfifo(e.pkg() / "reports/trt_lint.json"),
            _open(e.pkg()),
        ),
    ),
    case(
        "pkg-tokenizer-json-corrupt",
        IntegrityError,
        "cannot parse tokenizer JSON",
        lambda e: (
            e.pkg().joinpath("tokenizer.json").write_text('{"model": 42}'),
            _open(_relist(e.pkg(), "tokenizer.json")).embed_texts(["a red circle"]),
        ),
        native=True,
    ),
    # --- ONNX files: parsed (never executed) during verification -----------------------------------
    case(
        "onnx-not-protobuf",
        IntegrityError,
        r"onnx/text\.onnx: not a readable ONNX model",
        lambda e: (
            e.pkg().joinpath("onnx/text.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + bytes(range(64))),
            _open(_relist(e.pkg(), "onnx/text.onnx")),
        ),
        native=True,
    ),
    case(
        "onnx-opset-newer-than-runtime",
        UnsupportedError,
        r"opset 99 is newer than this runtime supports",
        lambda e: _open(_rewrite_onnx(e.pkg(), "onnx/vision.onnx", lambda m: _set_opset(m, 99))),
        native=True,
    ),
    case(
        "onnx-ir-version-too-new",
        UnsupportedError,
        r"IR version \d+ is newer than supported",
        lambda e: _open(_rewrite_onnx(e.pkg(), "onnx/vision.onnx", lambda m: setattr(m, "ir_version", 99))),
        native=True,
    ),
    # --- ONNX external data: every reference must stay inside a listed file -----------------------
    case(
        "ext-location-parent-dir",
        IntegrityError,
        r"external data location '\.\./tokenizer\.json' must be relative",
        lambda e: _verify(_external(e, location="../tokenizer.json")),
    ),
    case(
        "ext-location-absolute",
        IntegrityError,
        r"external data location '/etc/passwd' must be relative",
        lambda e: _verify(_external(e, location="/etc/passwd")),
    ),
    case(
        "ext-location-unlisted",
        IntegrityError,
        r"external data file 'onnx/secret\.bin' is not listed",
        lambda e: (
            e.pkg().joinpath("onnx/secret.bin").write_bytes(b"\0" * 64),
            _verify(_external(e, location="secret.bin")),
        ),
    ),
    case(
        "ext-location-symlink",
        IntegrityError,
        r"'onnx/ext\.bin' goes through a symlink",
        lambda e: _verify(_external(e, symlink=True)),
    ),
    case(
        "ext-offset-past-end",
        IntegrityError,
        r"external data of 'w' points outside 'onnx/ext\.bin'",
        lambda e: _verify(_external(e, offset="64", length="64")),
    ),
    case(
        "ext-length-past-end",
        IntegrityError,
        r"external data of 'w' points outside",
        lambda e: _verify(_external(e, length=str(10**12))),
    ),
    case(
        "ext-negative-offset",
        IntegrityError,
        r"external data of 'w' points outside",
        lambda e: _verify(_external(e, offset="-8")),
    ),
    case(
        "ext-offset-not-integer",
        IntegrityError,
        r"offset/length of 'w' are not integers",
        lambda e: _verify(_external(e, offset="0x10")),
    ),
    case(
        "ext-unknown-key",
        IntegrityError,
        r"external data of 'w' has unknown keys \['basepath'\]",
        lambda e: _verify(_external(e, extra={"basepath": "/"})),
    ),
    case(
        "ext-in-node-attribute",
        IntegrityError,
        r"external data location '\.\./\.\./x' must be relative",
        lambda e: _verify(_external(e, location="../../x", in_attribute=True)),
    ),
    # --- checkpoints: safetensors only unless opted in; weights must fit the family config --------
    case(
        "ckpt-pickle-bin-refused",
        UnsupportedError,
        r"pytorch_model\.bin is a pickle-based checkpoint.*allow_pickle",
        lambda e: _load_ckpt(_hf_dir_with_pickle(e)),
    ),
    case(
        "ckpt-pickle-pt-refused",
        UnsupportedError,
        r"w\.pt is a pickle-based checkpoint, which can run code",
        lambda e: _load_weights(_torch_save(e, "w.pt", {"w": _zeros()})),
    ),
    case(
        "ckpt-pickle-payload-with-opt-in",
        IntegrityError,
        r"refused by the weights-only loader",
        lambda e: _load_weights(_torch_save(e, "evil.pt", {"w": _GetPid()}), allow_pickle=True),
    ),
    case(
        "ckpt-unknown-weights-format",
        UnsupportedError,
        r"unknown weights format; accepted: \.safetensors",
        lambda e: _load_weights(Path(_write(e, "w.npz", b"PK\x03\x04"))),
    ),
    case(
        "ckpt-tensor-wrong-name",
        ConfigError,
        r"missing \['logit_scale'\], unexpected \['logit_scal'\]",
        lambda e: _load_ckpt(_ckpt_tensors(e, lambda t: t.__setitem__("logit_scal", t.pop("logit_scale")))),
    ),
    case(
        "ckpt-tensor-wrong-shape",
        ConfigError,
        r"token_embedding\.weight has shape \(116, 96\), the config needs \(115, 96\)",
        lambda e: _load_ckpt(
            _ckpt_tensors(
                e, lambda t: t.__setitem__("text_model.embeddings.token_embedding.weight", _zeros(116, 96))
            )
        ),
    ),
    case(
        "ckpt-tensor-wrong-dtype",
        ConfigError,
        r"logit_scale has dtype torch\.int64; floating point expected",
        lambda e: _load_ckpt(_ckpt_tensors(e, lambda t: t.__setitem__("logit_scale", _zeros(dtype="int64")))),
    ),
    case(
        "ckpt-safetensors-truncated",
        IntegrityError,
        r"model\.safetensors: not a readable safetensors file",
        lambda e: (_truncate(e.ckpt() / "model.safetensors"), _load_ckpt(e.ckpt())),
        native=True,
    ),
    case(
        "ckpt-safetensors-header-2^60",
        IntegrityError,
        r"not a readable safetensors file .*header too large",
        lambda e: (
            e.ckpt().joinpath("model.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}"),
            _load_ckpt(e.ckpt()),
        ),
        native=True,
    ),
    case(
        "ckpt-config-not-object",
        ConfigError,
        r"config\.json must hold a JSON object",
        lambda e: (e.ckpt().joinpath("config.json").write_text("[1, 2]"), _load_ckpt(e.ckpt())),
    ),
    case(
        "ckpt-config-not-json",
        ConfigError,
        r"config\.json is not valid JSON",
        lambda e: (e.ckpt().joinpath("config.json").write_text("{family: clip"), _load_ckpt(e.ckpt())),
    ),
    case(
        "ckpt-config-wrong-format",
        ConfigError,
        r"is not an mmedge checkpoint",
        lambda e: _load_ckpt(_ckpt_config(e, lambda m: m.pop("format"))),
    ),
    case(
        "ckpt-unknown-family",
        ConfigError,
        r"unknown family 'bogus'; known: \[.*'clip'",
        lambda e: _load_ckpt(_ckpt_config(e, lambda m: m.update(family="bogus"))),
    ),
    case(
        "ckpt-config-unknown-key",
        ConfigError,
        r"clip config 'vision': unknown keys \['dropout'\]",
        lambda e: _load_ckpt(_ckpt_config(e, lambda m: m["config"]["vision"].update(dropout=0.1))),
    ),
    case(
        "ckpt-config-wrong-type",
        ConfigError,
        r"width.*big",
        run=lambda e: _load_ckpt(_ckpt_config(e, lambda m: m["config"]["vision"].update(width="big"))),
    ),
    case(
        "ckpt-config-negative-layers",
        ConfigError,
        r"layers.*-1",
        run=lambda e: _load_ckpt(_ckpt_config(e, lambda m: m["config"]["vision"].update(layers=-1))),
    ),
    case(
        "ckpt-not-a-directory",
        ConfigError,
        r"is not a directory; expected an mmedge checkpoint",
        lambda e: _load_ckpt(e.tmp / "no-such-ckpt"),
    ),
    # --- images: caps and format checked from the header, before any decoder allocates ------------
    case(
        "img-empty-file",
        InvalidInputError,
        r"image is empty \(0 bytes\)",
        lambda e: e.pipe.embed_images([_write(e, "empty.png", b"")]),
    ),
    case(
        "img-truncated-png",
        InvalidInputError,
        r"corrupt or truncated png",
        lambda e: e.pipe.embed_images([_encode(".png")[:-30]]),
        native=True,
    ),
    case(
        "img-truncated-jpeg",
        InvalidInputError,
        r"corrupt or truncated jpeg.*no end-of-image marker",
        lambda e: e.pipe.embed_images([_encode(".jpg")[:-40]]),
        native=True,
    ),
    case(
        "img-pdf",
        InvalidInputError,
        r"image data is an unknown format; accepted formats: png",
        lambda e: e.pipe.embed_images([_write(e, "doc.png", b"%PDF-1.4\n" + b"x" * 100)]),
    ),
    case(
        "img-gif-not-enabled",
        InvalidInputError,
        r"image data is gif, which is not enabled; accepted formats: png, jpeg",
        lambda e: _load_image(_GIF_1X1, formats=("png", "jpeg")),
    ),
    case(
        "img-png-header-20000x20000",
        InvalidInputError,
        r"20000x20000 = 400000000 pixels; the cap is 50000000",
        lambda e: e.pipe.embed_images([_write(e, "huge.png", _png_declaring(20000, 20000))]),
        native=True,
    ),
    case(
        "img-jpeg-header-65000x65000",
        InvalidInputError,
        r"65000x65000 = \d+ pixels; the cap is",
        lambda e: e.pipe.embed_images([_jpeg_declaring(65000, 65000)]),
        native=True,
    ),
    case(
        "img-webp-header-16384x16384",
        InvalidInputError,
        r"16384x16384 = \d+ pixels; the cap is",
        lambda e: e.pipe.embed_images([_webp_vp8x(16384, 16384)]),
        native=True,
    ),
    case(
        "img-bmp-header-100000x100000",
        InvalidInputError,
        r"100000x100000 = \d+ pixels; the cap is",
        lambda e: e.pipe.embed_images([_bmp_declaring(100000, 100000)]),
        native=True,
    ),
    case(
        "img-png-chunk-declares-4GB",
        InvalidInputError,
        r"declares 4294967280 bytes but the file ends first",
        lambda e: e.pipe.embed_images(
            [_PNG_SIG + _ihdr(8, 8) + struct.pack(">I", 0xFFFFFFF0) + b"IDAT" + b"\0" * 64]
        ),
        native=True,
    ),
    case(
        "img-png-200k-chunks",
        InvalidInputError,
        r"PNG has more than 200000 chunks",
        lambda e: e.pipe.embed_images([_PNG_SIG + _ihdr(8, 8) + _chunk(b"tEXt", b"") * 200_001]),
        native=True,
    ),
    case(
        "img-bytes-over-cap",
        InvalidInputError,
        r"image is \d+ bytes; the limit is 64 bytes",
        lambda e: _load_image(_encode(".png"), max_bytes=64),
    ),
    case(
        "img-file-over-cap-not-read",
        InvalidInputError,
        r"image is 65 bytes; the limit is 64 bytes",
        lambda e: _load_image(_write(e, "big.png", b"\0" * 65), max_bytes=64),
    ),
    case(
        "img-fifo-path-never-opened",
        InvalidInputError,
        r"is not a regular file",
        lambda e: e.pipe.embed_images([_fifo(e)]),
    ),
    case(
        "img-missing-file",
        InvalidInputError,
        r"cannot read image file .*No such file",
        lambda e: e.pipe.embed_images([str(e.tmp / "no-such.png")]),
    ),
    case(
        "img-path-with-nul",
        InvalidInputError,
        r"image path contains a NUL character",
        lambda e: e.pipe.embed_images(["a\x00b.png"]),
    ),
    case(
        "img-zero-size-array",
        InvalidInputError,
        r"image has zero size \(10x0\)",
        lambda e: e.pipe.embed_images([np.zeros((0, 10, 3), np.uint8)]),
    ),
    case(
        "img-array-wrong-dtype",
        InvalidInputError,
        r"image array dtype int32; accepted: uint8, float32/64",
        lambda e: e.pipe.embed_images([np.zeros((8, 8, 3), np.int32)]),
    ),
    case(
        "img-array-wrong-rank",
        InvalidInputError,
        r"image array has shape \(2, 8, 8, 3, 1\); accepted",
        lambda e: e.pipe.embed_images([np.zeros((2, 8, 8, 3, 1), np.uint8)]),
    ),
    case(
        "img-array-5-channels",
        InvalidInputError,
        r"image array has shape \(8, 8, 5\)",
        lambda e: e.pipe.embed_images([np.zeros((8, 8, 5), np.uint8)]),
    ),
    case(
        "img-array-nan",
        InvalidInputError,
        r"image array contains NaN or infinity",
        lambda e: e.pipe.embed_images([_with(np.full((8, 8, 3), 0.5, np.float32), (3, 3, 1), np.nan)]),
    ),
    case(
        "img-array-float-out-of-range",
        InvalidInputError,
        r"values in \[0\.0, 255\.0\]; accepted range is \[0, 1\]",
        lambda e: e.pipe.embed_images([_with(np.zeros((8, 8, 3), np.float32), (0, 0, 0), 255.0)]),
    ),
    case(
        "img-array-over-pixel-cap",
        InvalidInputError,
        r"image is 20x20 = 400 pixels; the cap is 100",
        lambda e: _load_image(np.zeros((20, 20, 3), np.uint8), max_pixels=100),
    ),
    case(
        "img-channel-order-invalid",
        InvalidInputError,
        r"channel_order 'BRG' is not accepted; use 'RGB' or 'BGR'",
        lambda e: e.pipe.embed_images([IMG], channel_order="BRG"),
    ),
    case(
        "img-not-an-image-object",
        InvalidInputError,
        r"cannot load an image from dict; accepted: a path, bytes",
        lambda e: e.pipe.embed_images([{"path": "a.png"}]),
    ),
    # --- texts: caps and types checked before the Rust tokenizer sees them ------------------------
    case("text-empty", InvalidInputError, r"empty text at index 0", lambda e: e.pipe.embed_texts([""])),
    case(
        "text-whitespace-only",
        InvalidInputError,
        r"empty text at index 1: blank or whitespace-only",
        lambda e: e.pipe.embed_texts(["a cat", " \t\n\u3000"]),
    ),
    case(
        "text-1MB",
        InvalidInputError,
        r"text 0 has 1048576 characters; the limit is 10000",
        lambda e: e.pipe.embed_texts(["a" * (1 << 20)]),
        native=True,
    ),
    case(
        "text-bytes-not-str",
        InvalidInputError,
        r"text 0 is bytes; expected str",
        lambda e: e.pipe.embed_texts([b"bytes are not text"]),
    ),
    case(
        "text-none",
        InvalidInputError,
        r"text 0 is NoneType; expected str",
        lambda e: e.pipe.embed_texts(None),
    ),
    case(
        "text-lone-surrogate",
        InvalidInputError,
        r"text 0 is not valid Unicode",
        lambda e: e.pipe.embed_texts(["ok \ud800 ok"]),
        native=True,
    ),
    case("text-empty-list", InvalidInputError, r"no texts given", lambda e: e.pipe.embed_texts([])),
    case(
        "text-4097-in-one-call",
        InvalidInputError,
        r"4097 texts in one call; the limit is 4096",
        lambda e: e.pipe.embed_texts(["a"] * 4097),
    ),
    case(
        "tokenizer-json-garbage",
        IntegrityError,
        r"cannot parse tokenizer JSON",
        lambda e: _tokenizer_from_json('{"version": "1.0", "model": {"type": "BPE", "vocab": 7}}'),
        native=True,
    ),
    case(
        "tokenizer-context-no-room",
        ConfigError,
        r"context_length 2 leaves no room for text after 2 special tokens",
        lambda e: _tokenizer_from_file(e, context_length=2),
    ),
    # --- arrays at the component boundary: dtype, rank, dims and values against the manifest ------
    case(
        "array-wrong-dtype",
        InvalidInputError,
        r"vision\.pixel_values: expected float32 with 4 dims, got float64",
        lambda e: e.pipe.runner.run_batched("vision", {"pixel_values": np.zeros((1, 3, 64, 64))}),
    ),
    case(
        "array-wrong-rank",
        InvalidInputError,
        r"vision\.pixel_values: expected float32 with 4 dims, got float32 \(3, 64, 64\)",
        lambda e: e.pipe.runner.run_batched("vision", {"pixel_values": np.zeros((3, 64, 64), np.float32)}),
    ),
    case(
        "array-fixed-dim-mismatch",
        InvalidInputError,
        r"shape \(1, 3, 32, 32\) does not fit \('batch', 3, 64, 64\)",
        lambda e: e.pipe.runner.run_batched("vision", {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}),
    ),
    case(
        "array-dim-above-range",
        InvalidInputError,
        r"text\.input_ids: sequence=33 outside \[1, 32\]",
        lambda e: e.pipe.runner.run_batched("text", _text_feeds(np.ones((1, 33), np.int64))),
    ),
    case(
        "array-dim-below-range",
        InvalidInputError,
        r"text\.input_ids: sequence=0 outside \[1, 32\]",
        lambda e: e.pipe.runner.run_batched("text", _text_feeds(np.ones((1, 0), np.int64))),
    ),
    case(
        "array-dims-disagree",
        InvalidInputError,
        r"dim 'sequence' is 5 and 6 in different inputs",
        lambda e: e.pipe.runner.run_batched(
            "text", _text_feeds(np.ones((1, 5), np.int64), np.ones((1, 6), np.int64))
        ),
    ),
    case(
        "array-nan",
        InvalidInputError,
        r"vision\.pixel_values: contains NaN or infinity",
        lambda e: e.pipe.runner.run_batched(
            "vision", {"pixel_values": _with(np.zeros((1, 3, 64, 64), np.float32), (0, 1, 2, 3), np.nan)}
        ),
    ),
    case(
        "array-inf",
        InvalidInputError,
        r"vision\.pixel_values: contains NaN or infinity",
        lambda e: e.pipe.runner.run_batched(
            "vision", {"pixel_values": _with(np.zeros((1, 3, 64, 64), np.float32), (0, 0, 0, 0), -np.inf)}
        ),
    ),
    case(
        "array-missing-input",
        InvalidInputError,
        r"text: missing input 'attention_mask'",
        lambda e: e.pipe.runner.run_batched("text", {"input_ids": np.ones((1, 4), np.int64)}),
    ),
    case(
        "array-list-not-ndarray",
        InvalidInputError,
        r"text\.input_ids: expected a numpy array, got list",
        lambda e: e.pipe.runner.run_batched("text", {"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}),
    ),
    case(
        "array-token-id-above-vocab",
        InvalidInputError,
        r"text.input_ids: values must be in \[0, 115\), got values in \[1, 1000000\]",
        lambda e: e.pipe.runner.run_batched("text", _text_feeds(np.array([[1, 10**6]], np.int64))),
    ),
    case(
        "array-token-id-negative",
        InvalidInputError,
        r"text.input_ids: values must be in \[0, 115\), got values in \[-5, 1\]",
        lambda e: e.pipe.runner.run_batched("text", _text_feeds(np.array([[1, -5]], np.int64))),
    ),
    case(
        "array-unknown-component",
        IntegrityError,
        r"has no component 'audio'; it has \['text', 'vision'\]",
        lambda e: e.pipe.runner.run_batched("audio", {}),
    ),
    # --- request parameters ----------------------------------------------------------------------
    case(
        "param-search-k-zero",
        InvalidInputError,
        r"k must be a positive int, got 0",
        lambda e: e.pipe.search("a red circle", k=0),
    ),
    case(
        "param-search-k-negative",
        InvalidInputError,
        r"k must be a positive int, got -3",
        lambda e: e.pipe.search("a red circle", k=-3),
    ),
    case(
        "param-search-k-float",
        InvalidInputError,
        r"k must be a positive int, got 2\.5",
        lambda e: e.pipe.search("a red circle", k=2.5),
    ),
    case(
        "param-search-k-str",
        InvalidInputError,
        r"k must be a positive int, got '3'",
        lambda e: e.pipe.search("a red circle", k="3"),
    ),
    case(
        "param-search-k-bool",
        InvalidInputError,
        r"k must be a positive int, got True",
        lambda e: e.pipe.search("a red circle", k=True),
    ),
    case(
        "param-classify-no-labels", InvalidInputError, r"no labels given", lambda e: e.pipe.classify(IMG, [])
    ),
    case(
        "param-classify-blank-label",
        InvalidInputError,
        r"labels must be non-empty strings",
        lambda e: e.pipe.classify(IMG, ["circle", "  "]),
    ),
    case(
        "param-classify-template-without-slot",
        InvalidInputError,
        r"each template must be a string containing '\{\}'",
        lambda e: e.pipe.classify(IMG, ["circle"], templates=["a photo"]),
    ),
    case(
        "param-add-negative-id",
        InvalidInputError,
        r"ids must be 1 non-negative integers",
        lambda e: e.pipe.add_images([IMG], ids=[-1]),
    ),
    case(
        "param-add-duplicate-ids",
        InvalidInputError,
        r"ids must be unique",
        lambda e: e.pipe.add_images([IMG, IMG], ids=[7, 7]),
    ),
    case(
        "param-add-label-count",
        InvalidInputError,
        r"got 1 labels for 2 vectors",
        lambda e: e.pipe.add_images([IMG, IMG], labels=["one"]),
    ),
    case(
        "param-add-ragged-ids",
        InvalidInputError,
        r"ids must be 2 non-negative integers, got a ragged list",
        lambda e: e.pipe.add_images([IMG, IMG], ids=[[1], 2]),
    ),
    case(
        "param-add-labels-not-a-sequence",
        InvalidInputError,
        r"labels must be a sequence with one label per item, got int",
        lambda e: e.pipe.add_images([IMG], labels=5),
    ),
    case(
        "param-unknown-precision",
        UnsupportedError,
        r"precision 'int3' not in \('auto', 'fp32', .*\)",
        lambda e: _pipeline(e, precision="int3"),
    ),
    case(
        "param-precision-not-built",
        UnsupportedError,
        r"component 'text' has no int8 precision \(has \['fp32'\]\); run `mmedge calibrate`",
        lambda e: _pipeline(e, precision="int8").embed_texts(["a red circle"]),
    ),
    case(
        "param-unknown-backend",
        UnsupportedError,
        r"backend 'tflite' is not supported; choose from \['ort', 'tensorrt'\]",
        lambda e: _pipeline(e, backend="tflite"),
    ),
    case(
        "param-unknown-device",
        UnsupportedError,
        r"device 'tpu' is not supported; choose from",
        lambda e: _pipeline(e, device="tpu"),
    ),
    case(
        "param-threads-negative",
        InvalidInputError,
        r"threads must be an int in \[0, 1024\] .*got -1",
        lambda e: _pipeline(e, threads=-1),
    ),
    case(
        "param-threads-float",
        InvalidInputError,
        r"threads must be an int in \[0, 1024\] .*got 1\.5",
        lambda e: _pipeline(e, threads=1.5),
    ),
    case(
        "param-threads-2^31",
        InvalidInputError,
        r"threads must be an int in \[0, 1024\] .*got 2147483648",
        lambda e: _pipeline(e, threads=2**31),
    ),
    case(
        "param-image-formats-unknown",
        ConfigError,
        r"image formats \('tiff',\) are not all supported",
        lambda e: _load_image(IMG, formats=("tiff",)),
    ),
    case(
        "param-unknown-package-name",
        ModelNotFoundError,
        r"no model package 'clip-tinny'; packages in .*: clip-tiny",
        lambda e: (_store_with_package(e), _open_name("clip-tinny")),
    ),
    case(
        "param-empty-store",
        ModelNotFoundError,
        r"no model package 'clip-tiny'; the store .* is empty",
        lambda e: _open_name("clip-tiny"),
    ),
    case(
        "param-index-tampered",
        IntegrityError,
        r"index\.usearch is missing or its sha256 differs",
        lambda e: _index_dir(e, lambda d: _flip_last_byte(d / "index.usearch")),
    ),
    case(
        "param-index-wrong-dimension",
        InvalidInputError,
        r"index has dimension 4; this model embeds to 96",
        lambda e: setattr(e.pipe, "index", _index_dir(e, lambda d: None)),
    ),
]


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


# --- running the table ---------------------------------------------------------------------------


@contextmanager
def _watchdog(file: object = None, seconds: float = CASE_TIMEOUT_S):
    """If a row hangs, even inside native code, dump every thread's stack to `file` and end the process."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=file or sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _check(exc: BaseException, expected: type[MmedgeError], match: str) -> str | None:
    """None if `exc` is exactly the documented error naming the problem, else what is wrong."""
    if type(exc) is not expected:
        return f"raised {type(exc).__module__}.{type(exc).__name__}: {exc}; expected {expected.__name__}"
    if not re.search(match, str(exc)):
        return f"{expected.__name__} message {str(exc)!r} does not match {match!r}"
    return None


@pytest.fixture(scope="module")
def shared_pipe(tiny_pkg_session: Path):
    from mmedge import sdk

    return sdk.Pipeline(str(tiny_pkg_session))


@pytest.fixture()
def env(tmp_path: Path, tiny_pkg_session: Path, tiny_ckpt: Path, shared_pipe, store: Path) -> Env:
    return Env(tmp_path, tiny_pkg_session, tiny_ckpt, lambda: shared_pipe, store=store)


def test_table_is_large_and_distinct() -> None:
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 45
    assert len({p.id.split("-")[0] for p in CASES}) >= 7  # every category is represented


def _terminal_stderr(config: pytest.Config) -> object:
    """The terminal's stderr, which pytest's capturing does not swallow (as its faulthandler plugin uses)."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        return config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError):  # another pytest version, or -p no:faulthandler
        return sys.__stderr__


@pytest.mark.parametrize("run, expected, match", CASES)
def test_bad_input(
    run: Callable[[Env], object],
    expected: type[MmedgeError],
    match: str,
    env: Env,
    request: pytest.FixtureRequest,
) -> None:
    with _watchdog(_terminal_stderr(request.config)), pytest.raises(MmedgeError) as info:
        run(env)
    problem = _check(info.value, expected, match)
    assert problem is None, problem


def test_special_tokens_in_user_text_are_plain_text(shared_pipe, tiny_pkg_session: Path) -> None:
    """A typed special token is not an error and never becomes the special token itself."""
    spec = json.loads((tiny_pkg_session / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}
    assert "<|endoftext|>" in specials
    # Characters outside clip-tiny's small vocabulary legitimately become <unk>; no other special may appear.
    forbidden = {i for content, i in specials.items() if content != spec["model"].get("unk_token")}
    texts = [f"a red {s} circle" for s in specials] + ["".join(specials)]
    tok = shared_pipe.runner.tokenizer
    ids, mask = tok.encode_batch(texts)
    (plain,), _ = tok.encode_batch(["a red circle"])
    for row, m in zip(ids, mask):
        body = row[: int(m.sum())].tolist()
        # The post-processor's start and end tokens are the only special ids; typed ones are split up.
        assert body[0] == plain[0] and body[-1] == plain[-1], body
        assert not set(body[1:-1]) & forbidden and len(body) > 4, body
    vecs = shared_pipe.embed_texts(texts)
    assert vecs.shape == (len(texts), shared_pipe.dim) and np.isfinite(vecs).all()
    # The text tower pools at the end token: a typed "<|endoftext|>" must not end the caption early.
    early = shared_pipe.embed_texts(["a red"])[0]
    assert not np.allclose(vecs[texts.index("a red <|endoftext|> circle")], early, atol=1e-4)


def test_native_rows_in_child_process(tmp_path: Path, tiny_pkg_session: Path, tiny_ckpt: Path) -> None:
    """Rows that reach native parsers, again in a fresh process: a segfault or hang fails with the row's id."""
    cmd = [
        sys.executable,
        __file__,
        "--pkg",
        str(tiny_pkg_session),
        "--ckpt",
        str(tiny_ckpt),
        "--tmp",
        str(tmp_path),
        *NATIVE,
    ]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"child hung after {CHILD_TIMEOUT_S}s; last row started: {_last_started(out)}\n{out}")
    if proc.returncode < 0 or proc.returncode > 1:
        pytest.fail(
            f"child died (exit {proc.returncode}) in row {_last_started(proc.stdout)}\n{proc.stderr[-4000:]}"
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert sum(line.startswith("OK ") for line in proc.stdout.splitlines()) == len(NATIVE), proc.stdout


def _last_started(out: str) -> str:
    started = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("START ")]
    return started[-1] if started else "(none)"


def _main(argv: list[str]) -> int:
    """Run rows (default: all) in this process; prints START/OK/FAIL per row, exit 1 if any failed."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pkg", type=Path, help="an exported clip-tiny package (default: build one)")
    ap.add_argument("--ckpt", type=Path, help="its checkpoint (default: build one)")
    ap.add_argument("--tmp", type=Path, help="scratch directory (default: a new temporary one)")
    ap.add_argument("ids", nargs="*", help="row ids to run (default: all)")
    args = ap.parse_args(argv)
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="mmedge-battery-"))
    if args.pkg is None or args.ckpt is None:
        from mmedge.export.exporter import export_model
        from mmedge.models.init import init_checkpoint

        args.ckpt = init_checkpoint("clip-tiny", tmp / "src-ckpt", seed=0)
        args.pkg = tmp / "src-pkg"
        export_model(args.ckpt, args.pkg)
    rows = {p.id: p for p in CASES}
    unknown = set(args.ids) - set(rows)
    if unknown:
        ap.error(f"unknown row ids {sorted(unknown)}")
    pipes: list[object] = []

    def pipe() -> object:
        if not pipes:
            pipes.append(_open(args.pkg))
        return pipes[0]

    failed = 0
    for i, rid in enumerate(args.ids or list(rows)):
        run, expected, match = rows[rid].values
        xfail = any(m.name == "xfail" for m in rows[rid].marks)
        work = tmp / f"row{i}"
        work.mkdir()
        store = work / "store"
        store.mkdir()
        os.environ["MMEDGE_HOME"] = str(store)
        print("START", rid, flush=True)
        try:
            with _watchdog():
                run(Env(work, args.pkg, args.ckpt, pipe, store=store))
            problem = "raised nothing"
        except BaseException as exc:  # anything other than the expected error is what we report
            if isinstance(exc, KeyboardInterrupt):
                raise
            problem = _check(exc, expected, match)
        if problem is None or xfail:
            print("OK" if problem is None else "XFAIL", rid, flush=True)
        else:
            failed += 1
            print("FAIL", rid, problem, flush=True)
    if args.tmp is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
