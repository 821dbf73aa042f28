"""Coverage-guided fuzzing (atheris / libFuzzer) of mmedge's untrusted-input entry points.

Targets: manifest (the package manifest parser), external_data (the ONNX external-data validator),
image (the image loader and preprocessing), tokenizer (the text/tokenizer wrapper and tokenizer.json
loading), params (request parameters of a retrieval pipeline), index (a vector index directory
from elsewhere: mutated index.usearch / index.json with the sha256 recomputed), tokenizer_json (the
tokenizer rules and loader on raw tokenizer.json bytes) and image_header (the PNG and JPEG header
readers). A finding is any exception that is not a `mmedge.errors.MmedgeError` (including a failed
invariant on an accepted input), a crash or a hang.

    pip install atheris                          # on demand; not a project dependency
    python fuzz/fuzz_entry_points.py --target image -max_total_time=60
    python fuzz/fuzz_entry_points.py --target params --package ~/.cache/mmedge/clip-tiny -runs=2000

Every argument after the harness's own options goes to libFuzzer (`-max_total_time`, `-runs`,
`-timeout`, corpus directories, ...). Without a corpus directory, a temporary one is seeded from
`seeds(target)`. The tokenizer and params targets use `--package` (default: a random-weight clip-tiny
package built in a temporary directory, which needs the `export` extra). Each target's one-input
function is importable without atheris: `make_target(name, package)` returns it, and
tests/security/test_fuzz_targets.py runs every target over fixed seeds in the normal suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGETS = (
    "manifest",
    "external_data",
    "image",
    "tokenizer",
    "params",
    "index",
    "tokenizer_json",
    "image_header",
)
# Imported inside atheris.instrument_imports() when fuzzing, so coverage guides the mutations.
MMEDGE_MODULES = (
    "mmedge.errors",
    "mmedge.runtime.manifest",
    "mmedge.runtime.package",
    "mmedge.runtime.image_headers",
    "mmedge.runtime.images",
    "mmedge.runtime.texts",
    "mmedge.runtime.index",
    "mmedge.runtime.usearch_file",
    "mmedge.runtime.tokenizer_policy",
    "mmedge.runtime.components",
    "mmedge.runtime.retrieval",
    "mmedge.runtime.store",
    "mmedge.sdk.pipeline",
    "mmedge.sdk",
)


class Input:
    """Deterministic reader of fuzzer bytes (a small FuzzedDataProvider that needs no atheris)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        return self.take(len(self.data))

    def int(self, nbytes: int = 4) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "little", signed=True)

    def text(self, max_len: int = 64) -> str:
        return self.take(self.byte() % (max_len + 1)).decode("utf-8", "replace")

    def pick(self, options: tuple | list) -> Any:
        return options[self.byte() % len(options)]

    def value(self) -> Any:
        """A parameter value of a fuzzed type: ints of every size, floats, strings, None, bools, lists."""
        import numpy as np

        kind = self.byte() % 10
        if kind <= 2:
            return self.int(1)
        if kind == 3:
            return self.int(8) * (1 << (self.byte() % 80))
        if kind == 4:
            return self.pick((0.0, -1.0, 2.5, math.nan, math.inf, -math.inf, 1e300))
        if kind == 5:
            return self.text(12)
        if kind == 6:
            return self.pick((None, True, False, b"3", [], [1], {}))
        if kind == 7:
            return np.int64(self.int(2))
        if kind == 8:
            return [self.text(8) for _ in range(self.byte() % 4)]
        return self.int(2)


def _is_mmedge_error(exc: BaseException) -> bool:
    from mmedge.errors import MmedgeError

    return isinstance(exc, MmedgeError)


# --- manifest -------------------------------------------------------------------------------------


def valid_manifest() -> str:
    """A small retrieval manifest that parses: two components wired into paths, one engine, a tokenizer."""
    from mmedge.runtime.manifest import (
        ComponentEntry,
        DimRange,
        EngineEntry,
        FileEntry,
        Manifest,
        PrecisionEntry,
        Provenance,
        TensorSpec,
    )
    from mmedge.runtime.sections import (
        Path,
        PipelineConfig,
        PreprocessConfig,
        RetrievalConfig,
        Step,
        TokenizerConfig,
    )

    batch = {"batch": DimRange(1, 1, 64)}
    pixels, ids = (
        TensorSpec("pixel_values", "float32", ("batch", 3, 64, 64)),
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
    )
    mask = TensorSpec("attention_mask", "int64", ("batch", "sequence"))
    image, text = (
        TensorSpec("image_embeds", "float32", ("batch", 96)),
        TensorSpec("text_embeds", "float32", ("batch", 96)),
    )
    vision = ComponentEntry(
        "image_encoder", (pixels,), (image,), batch, {"fp32": PrecisionEntry("onnx/v.onnx", {"cosine": 1.0})}
    )
    tower = ComponentEntry(
        "text_encoder",
        (ids, mask),
        (text,),
        {**batch, "sequence": DimRange(1, 16, 32)},
        {"fp32": PrecisionEntry("onnx/t.onnx")},
        "texts",
        {"input_ids": (0, 256)},
    )
    paths = {
        "image": Path(
            (Step("vision", {"pixel_values": "pixel_values"}, {"image_embeds": "image_embeds"}),),
            "image_embeds",
        ),
        "text": Path(
            (
                Step(
                    "text",
                    {"input_ids": "input_ids", "attention_mask": "attention_mask"},
                    {"text_embeds": "text_embeds"},
                ),
            ),
            "text_embeds",
        ),
    }
    return Manifest(
        name="fuzz",
        family="clip",
        variant="vit",
        task="retrieval",
        provenance=Provenance("0.1.0", "none", "1.0", 17, "2026-01-01T00:00:00+00:00", {"by": "fuzz"}),
        files={
            n: FileEntry(c * 64, 10)
            for n, c in (("onnx/v.onnx", "0"), ("onnx/t.onnx", "2"), ("tokenizer.json", "1"))
        },
        components={"vision": vision, "text": tower},
        pipeline=PipelineConfig(paths),
        preprocess=PreprocessConfig(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        tokenizer=TokenizerConfig("tokenizer.json", 32, 0),
        retrieval=RetrievalConfig(100.0),
        engines={"ort1.0-cpu": EngineEntry("ort", "1.0", "cpu", {}, {"vision.fp32": "onnx/v.onnx"})},
    ).to_json()


def _json_value(inp: Input) -> Any:
    kind = inp.byte() % 8
    if kind == 0:
        return inp.int(inp.pick((1, 2, 4, 8)))
    if kind == 1:
        return inp.pick((None, True, False, 0.5, -1, 0, 1e308, "", "..", "/abs", "a/../b", "batch", "fp32"))
    if kind == 2:
        return [_json_value(inp) for _ in range(inp.byte() % 3)]
    if kind == 3:
        return {inp.text(8): _json_value(inp) for _ in range(inp.byte() % 3)}
    return inp.text(16)


def _mutated_manifest(inp: Input) -> bytes:
    """The valid manifest with a few nested values replaced (structure-aware mode: input starts with 0x00)."""
    raw = json.loads(valid_manifest())
    for _ in range(1 + inp.byte() % 3):
        parent, key, node = None, None, raw
        for _ in range(1 + inp.byte() % 5):  # walk down to one nested value
            keys = (
                list(node)
                if isinstance(node, dict)
                else list(range(len(node)))
                if isinstance(node, list)
                else []
            )
            if not keys:
                break
            parent, key = node, inp.pick(keys)
            node = parent[key]
            if not isinstance(node, (dict, list)) or inp.byte() % 3 == 0:
                break
        if parent is None:
            continue
        action = inp.byte() % 4
        if isinstance(parent, dict) and action == 0:
            parent[inp.text(12)] = _json_value(inp)  # an extra key
        elif isinstance(parent, dict) and action == 1:
            del parent[key]
        else:
            parent[key] = _json_value(inp)
    return json.dumps(raw).encode()


def check_manifest(data: bytes) -> None:
    """Parse fuzzer bytes as manifest.json; an accepted manifest must serialise and re-parse identically."""
    from mmedge.errors import MmedgeError
    from mmedge.runtime.manifest import parse_manifest

    if data[:1] == b"\x00":
        data = _mutated_manifest(Input(data[1:]))
    try:
        m = parse_manifest(data)
    except MmedgeError:
        return
    text = m.to_json()
    assert parse_manifest(text).to_json() == text, "an accepted manifest does not round-trip"


# --- ONNX external data ---------------------------------------------------------------------------

_EXT_LOCATIONS = (
    "w.bin",
    "sub/v.bin",
    "../w.bin",
    "/etc/passwd",
    "./w.bin",
    "sub/../w.bin",
    "missing.bin",
    "",
    "w.bin\x00.txt",
    "sub",
    "C:\\w.bin",
    "m.onnx",
)
_EXT_NUMBERS = ("0", "4", "64", "65", "-1", "-8", "", "0x10", "1e3", " 8", str(2**63), str(10**30))
_EXT_KEYS = ("location", "offset", "length", "checksum", "basepath", "LOCATION")


class ExternalDataTarget:
    """ONNX files with fuzzed external-data entries (or raw fuzzed protobuf) against one listed layout."""

    def __init__(self, workdir: Path) -> None:
        from mmedge.runtime.manifest import FileEntry

        self.root = workdir / "external_data"
        (self.root / "sub").mkdir(parents=True, exist_ok=True)
        (self.root / "w.bin").write_bytes(bytes(64))
        (self.root / "sub" / "v.bin").write_bytes(bytes(16))
        files = {
            "m.onnx": FileEntry("0" * 64, 0),
            "w.bin": FileEntry("0" * 64, 64),
            "sub/v.bin": FileEntry("0" * 64, 16),
        }
        self.files = files

    def model_bytes(self, inp: Input) -> bytes:
        from onnx import TensorProto, helper

        mode = inp.byte() % 4
        if mode == 0:  # raw bytes straight into the protobuf parser
            return inp.rest()
        tensors = []
        for i in range(1 + inp.byte() % 3):
            t = TensorProto()
            t.name, t.data_type, t.data_location = f"w{i}", TensorProto.FLOAT, TensorProto.EXTERNAL
            t.dims.extend([4])
            for _ in range(inp.byte() % 5):
                entry = t.external_data.add()
                entry.key = inp.pick(_EXT_KEYS) if inp.byte() % 4 else inp.text(12)
                entry.value = inp.pick(_EXT_LOCATIONS + _EXT_NUMBERS) if inp.byte() % 4 else inp.text(24)
            tensors.append(t)
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
        if mode == 1:  # initializers
            nodes = [helper.make_node("Identity", [tensors[0].name], ["y"])]
            graph = helper.make_graph(nodes, "g", [], [out], initializer=tensors)
        elif mode == 2:  # Constant nodes' tensor attributes
            nodes = [
                helper.make_node("Constant", [], ["y" if i == 0 else f"c{i}"], value=t)
                for i, t in enumerate(tensors)
            ]
            graph = helper.make_graph(nodes, "g", [], [out])
        else:  # inside an If node's subgraphs
            branch = helper.make_graph(
                [helper.make_node("Identity", [tensors[0].name], ["y"])], "b", [], [out], initializer=tensors
            )
            cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
            graph = helper.make_graph(
                [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)],
                "g",
                [cond],
                [out],
            )
        opset = inp.pick((17, 17, 17, 1, 99))
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=inp.pick((8, 8, 3, 99))
        )
        return model.SerializeToString()

    def __call__(self, data: bytes) -> None:
        from mmedge.errors import MmedgeError
        from mmedge.runtime.package import check_onnx_file

        (self.root / "m.onnx").write_bytes(self.model_bytes(Input(data)))
        try:
            check_onnx_file(self.root, "m.onnx", self.files)
        except MmedgeError:
            return
        self._assert_inside()

    def _assert_inside(self) -> None:
        """Accepted: then every external entry points into a listed file, within its size."""
        import onnx

        from mmedge.runtime.onnx_files import iter_tensors

        model = onnx.load(str(self.root / "m.onnx"), load_external_data=False)
        for t in iter_tensors(model):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            loc = info.get("location", "")
            assert loc in self.manifest.files, f"accepted external data location {loc!r}"
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
            size = self.manifest.files[loc].size
            assert offset >= 0 and offset + max(length, 0) <= size, (
                f"accepted {offset}+{length} in {size} bytes"
            )


# --- images ---------------------------------------------------------------------------------------


def check_image(data: bytes) -> None:
    """Decode fuzzer bytes as an image file (or, after b"ARR", as a raw array) and preprocess it."""
    import numpy as np

    from mmedge.errors import MmedgeError
    from mmedge.runtime.images import (
        CLIP_MEAN,
        CLIP_STD,
        ImageLimits,
        PreprocessConfig,
        load_image,
        preprocess,
    )

    limits = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20)
    try:
        if data.startswith(b"ARR"):
            inp = Input(data[3:])
            dtype = inp.pick((np.uint8, np.float32, np.float64, np.int32, np.bool_, np.float16))
            shape = tuple(inp.byte() % 9 for _ in range(1 + inp.byte() % 4))
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            raw = inp.rest().ljust(n, b"\0")[:n]
            src = np.frombuffer(raw, dtype).reshape(shape)
            out = load_image(src, channel_order=inp.pick(("RGB", "BGR", "rgb", "")), limits=limits)
        else:
            out = load_image(data, limits=limits)
    except MmedgeError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.c_contiguous, out.shape
    pixels = preprocess([out], PreprocessConfig(32, CLIP_MEAN, CLIP_STD))
    assert pixels.shape == (1, 3, 32, 32) and np.isfinite(pixels).all()


# --- texts and the tokenizer ----------------------------------------------------------------------


class TokenizerTarget:
    """Fuzzer bytes as a batch of texts (split at 0x1e), or, when they start with "{", as tokenizer.json."""

    def __init__(self, tokenizer_json: str, context_length: int, pad_id: int | None) -> None:
        from mmedge.runtime.texts import TextTokenizer

        self.json, self.context_length, self.pad_id = tokenizer_json, context_length, pad_id
        self.tok = TextTokenizer.from_json(tokenizer_json, context_length, pad_id)

    def __call__(self, data: bytes) -> None:
        import numpy as np

        from mmedge.errors import MmedgeError
        from mmedge.runtime.texts import TextTokenizer

        if data.startswith(b"{"):
            try:
                TextTokenizer.from_json(data.decode("utf-8", "replace"), self.context_length, self.pad_id)
            except MmedgeError:
                pass
            return
        # surrogateescape: invalid UTF-8 becomes lone surrogates, which must be refused, not crash
        texts: list[Any] = data.decode("utf-8", "surrogateescape").split("\x1e")
        if data[:1] == b"\x1f":
            texts.append(data)  # a non-str item
        try:
            ids, mask = self.tok.encode_batch(texts)
        except MmedgeError:
            return
        assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape, (ids.shape, mask.shape)
        assert ids.shape[0] == len(texts) and 1 <= ids.shape[1] <= self.context_length, ids.shape
        assert set(np.unique(mask).tolist()) <= {0, 1} and (mask.sum(axis=1) >= 1).all()


# --- request parameters ---------------------------------------------------------------------------


class ParamsTarget:
    """Fuzzed values for every request parameter of a retrieval pipeline over one package."""

    def __init__(self, package: Path) -> None:
        import numpy as np

        from mmedge import sdk

        self.package = package
        self.pipe = sdk.Pipeline(str(package))
        self.image = np.full((32, 32, 3), 128, np.uint8)

    def __call__(self, data: bytes) -> None:
        from mmedge.errors import MmedgeError

        inp = Input(data)
        op = inp.byte() % 6
        try:
            self._run(op, inp)
        except MmedgeError:
            pass

    def _run(self, op: int, inp: Input) -> None:
        import numpy as np

        from mmedge import sdk
        from mmedge.runtime.index import VectorIndex

        p = self.pipe
        if op == 0:
            k = inp.value()
            p.index = VectorIndex(p.dim)
            p.add_images([self.image] * (1 + inp.byte() % 3))
            hits = p.search(inp.text(40) if inp.byte() % 2 else self.image, k=k)
            assert len(hits) <= min(int(k), len(p.index)), (k, hits)
        elif op == 1:
            labels = [inp.value() if inp.byte() % 3 == 0 else inp.text(16) for _ in range(inp.byte() % 5)]
            templates = (
                None
                if inp.byte() % 2
                else [inp.value() if inp.byte() % 3 == 0 else inp.text(16) for _ in range(inp.byte() % 3)]
            )
            out = p.classify(self.image, labels, templates=templates)
            assert [x.label for x in out] and abs(sum(x.score for x in out) - 1.0) < 1e-3, out
        elif op == 2:
            kwargs = {
                name: inp.value() if inp.byte() % 2 else inp.pick(choices)
                for name, choices in (
                    ("precision", ("auto", "fp32", "int8", "fp16", "int4")),
                    ("backend", ("ort", "tensorrt", "tflite")),
                    ("threads", (0, 1, 2, -1)),
                    ("device", ("cpu", "cuda", "tpu")),
                )
            }
            q = sdk.Pipeline(str(self.package), **kwargs)
            q.runner.precision_of("text")
        elif op == 3:
            p.index = VectorIndex(p.dim)
            n = 1 + inp.byte() % 3
            ids = None if inp.byte() % 2 else [inp.value() for _ in range(inp.byte() % 4)]
            labels = None if inp.byte() % 2 else [inp.text(8) for _ in range(inp.byte() % 4)]
            added = p.add_images([self.image] * n, ids=ids, labels=labels)
            assert len(added) == n == len(p.index), (added, len(p.index))
        elif op == 4:
            p.embed_images(
                [self.image], channel_order=inp.value() if inp.byte() % 2 else inp.pick(("RGB", "BGR"))
            )
        else:
            items = [inp.value() if inp.byte() % 4 == 0 else inp.text(24) for _ in range(inp.byte() % 4)]
            vecs = p.embed_texts(items)
            assert vecs.shape == (len(items), p.dim) and np.isfinite(vecs).all()


# --- vector index directories ---------------------------------------------------------------------


class IndexTarget:
    """A saved vector index with fuzzed bytes in index.usearch or index.json, re-hashed as an attacker would.

    First byte: mode (0 patch the binary, 1 patch the JSON, 2 the rest is the binary, 3 the rest is the
    JSON); then (u16 offset, u8 value) patches. An accepted index must answer a search consistently.
    """

    def __init__(self, workdir: Path) -> None:
        import numpy as np

        from mmedge.runtime.index import VectorIndex

        self.root, self.dir = workdir / "index", workdir / "index" / "idx"
        self.vectors = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
        idx = VectorIndex(8, model="fuzz")
        idx.add(np.arange(100, 140), self.vectors, labels=[f"item{i}" for i in range(40)])
        idx.remove([105])
        idx.save(self.root / "clean")
        self.binary = (self.root / "clean" / "index.usearch").read_bytes()
        self.meta = (self.root / "clean" / "index.json").read_bytes()

    def write(self, data: bytes) -> Path:
        """The index directory that these fuzzer bytes describe."""
        import hashlib

        inp = Input(data)
        mode = inp.byte() % 4
        binary, meta = bytearray(self.binary), bytearray(self.meta)
        if mode >= 2:
            binary, meta = (bytearray(inp.rest()), meta) if mode == 2 else (binary, bytearray(inp.rest()))
        else:
            target = binary if mode == 0 else meta
            while inp.pos + 3 <= len(inp.data):
                pos = int.from_bytes(inp.take(2), "little") % len(target)
                target[pos] = inp.byte()
        digest = hashlib.sha256(binary).hexdigest().encode()
        old = json.loads(self.meta)["sha256"].encode()
        meta = meta.replace(old, digest)  # the attacker's re-hash (a mangled JSON keeps its old one)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "index.usearch").write_bytes(bytes(binary))
        (self.dir / "index.json").write_bytes(bytes(meta))
        return self.dir

    def __call__(self, data: bytes) -> None:
        from mmedge.errors import MmedgeError
        from mmedge.runtime.index import VectorIndex

        path = self.write(data)
        try:
            idx = VectorIndex.load(path)
        except MmedgeError:
            return
        for exact in (False, True):
            idx.exact = exact
            hits = idx.search(self.vectors[:2], k=5)[0]
            assert len(hits) <= min(5, len(idx)), (len(hits), len(idx))
            assert all(h.id in idx and (h.label is None or isinstance(h.label, str)) for h in hits), hits


# --- tokenizer.json policy and image headers (fuzz_headers.py, beside this file) -------------------


def _sibling(name: str) -> Any:
    """A module beside this file, loaded by path: the harness runs as a script and tests load it by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"mmedge_fuzz_{name}", Path(__file__).with_name(f"{name}.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_headers = _sibling("fuzz_headers")
check_tokenizer_json = _headers.check_tokenizer_json
check_image_header = _headers.check_image_header


# --- wiring ---------------------------------------------------------------------------------------


def build_package(workdir: Path) -> Path:
    """A random-weight clip-tiny package (needs torch: the `export` extra)."""
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_checkpoint

    ckpt = init_checkpoint("clip-tiny", workdir / "ckpt", seed=0)
    export_model(ckpt, workdir / "pkg")
    return workdir / "pkg"


def make_target(
    name: str, package: Path | None = None, workdir: Path | None = None
) -> Callable[[bytes], None]:
    """The one-input function of a target; `package` is needed by tokenizer and params (else built)."""
    if name not in TARGETS:
        raise SystemExit(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"mmedge-fuzz-{name}-"))
    if name == "manifest":
        return check_manifest
    if name == "external_data":
        return ExternalDataTarget(workdir)
    if name == "image":
        return check_image
    if name == "index":
        return IndexTarget(workdir)
    if name == "tokenizer_json":
        return check_tokenizer_json
    if name == "image_header":
        return check_image_header
    package = package or build_package(workdir)
    if name == "tokenizer":
        from mmedge.runtime.manifest import MANIFEST_NAME, parse_manifest

        t = parse_manifest((package / MANIFEST_NAME).read_bytes()).tokenizer
        if t is None:
            raise SystemExit(f"{package} has no tokenizer to fuzz")
        return TokenizerTarget((package / t.file).read_text(), t.context_length, t.pad_id)
    return ParamsTarget(package)


def seeds(name: str, package: Path | None = None) -> list[bytes]:
    """Valid and nearly valid inputs that start a corpus (and that the pytest runs every time)."""
    import struct
    import zlib

    if name == "tokenizer_json":
        return _headers.hostile_tokenizer_seeds(package)
    if name == "image_header":
        return _headers.image_header_seeds()
    if name == "manifest":
        valid = valid_manifest().encode()
        out = [valid, valid[:200], b"{}", b"[]", b'{"a": ' * 50] + [
            bytes([0, i, i + 1, 2, i % 3]) for i in range(8)
        ]
        if package is not None:
            text = (package / "manifest.json").read_bytes()
            raw = json.loads(text)
            raw["provenance"] = {"nan": float("nan"), "deep": [[[[1]]]]}
            out += [text, json.dumps(raw).encode(), text[: len(text) // 2]]
        return out
    if name == "external_data":
        return [bytes([m, 1, 3, 0, 0, 1, 0, 1, 2, 1, 2, 3, 2]) for m in (1, 2, 3)] + [
            b"\x00\x08\x07",
            b"\x01\x00",
        ]
    if name == "image":
        import cv2
        import numpy as np

        img = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
        files = [cv2.imencode(ext, img)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".webp")]
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
        bomb = (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b"")
        )
        gif = (
            b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
            b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
        )
        return (
            files
            + [f[: len(f) // 2] for f in files]
            + [bomb, gif, b"ARR\x00\x03\x04\x04\x03" + bytes(48), b"ARR\x01\x02\x04\x04" + bytes(64)]
        )
    if name == "index":
        graph = 8 + 40 * 32 + 64 + 40 + 2 * 40  # where IndexTarget's nodes start (40 vectors of 8 floats)
        slot = (graph + 14).to_bytes(2, "little")  # node 0's first neighbour slot
        return [
            b"",
            b"\x00",
            b"\x00" + slot + b"\xff" + (graph + 15).to_bytes(2, "little") + b"\xff",
            b"\x00" + (graph - 2).to_bytes(2, "little") + b"\x07",  # a level past the graph's
            b"\x00\x00\x00\x00",  # the row count
            b"\x01\x05\x00\x41",
            b"\x01\x30\x00\x7b",
            b"\x02usearch",
            b"\x03{}",
            b"\x03" + b"[" * 5000,
            b'\x03{"format": "mmedge.index/1", "dim": true, "sha256": ""}',
        ] + [b"\x00" + i.to_bytes(2, "little") + b"\xff" for i in range(0, 3000, 150)]
    if name == "tokenizer":
        out = [
            "a red circle",
            "A RED <|endoftext|> circle\x1ebig blue star",
            " \x1ex",
            "\u00e9\u0301 \U0001f600",
            "x" * 300,
        ]
        raw = [s.encode() for s in out] + [b"\xff\xfe bad utf-8", b"\x1fbytes", b'{"model": 1}', b"{"]
        if package is not None:
            raw.append((package / "tokenizer.json").read_bytes())
        return raw
    return [
        bytes([op]) + tail
        for op in range(6)
        for tail in (b"", b"\x00\x03a b\x05\x02", b"\x04\x07\x01\x09\x02")
    ]


def _instrumented_import(atheris: Any) -> None:
    if any(m == "mmedge" or m.startswith("mmedge.") for m in sys.modules):
        raise SystemExit("mmedge was imported before instrumentation; run this file as a script")
    with atheris.instrument_imports(include=["mmedge"]):
        import importlib

        for module in MMEDGE_MODULES:
            importlib.import_module(module)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="other arguments go to libFuzzer"
    )
    ap.add_argument("--target", required=True, choices=TARGETS)
    ap.add_argument(
        "--package", type=Path, help="package for the tokenizer and params targets (default: build one)"
    )
    ap.add_argument(
        "--max-rss-mb",
        type=int,
        default=2048,
        help="an input that lifts peak memory above this is a finding (a decompression bomb)",
    )
    args, libfuzzer_args = ap.parse_known_args(argv[1:])
    try:
        import atheris
    except ImportError:
        raise SystemExit(
            "atheris is not installed: `pip install atheris` (Linux/macOS, CPython 3.8-3.12), "
            "then rerun this command"
        ) from None
    _instrumented_import(atheris)
    if args.package is None and args.target in ("tokenizer", "params"):
        args.package = build_package(Path(tempfile.mkdtemp(prefix="mmedge-fuzz-package-")))
    target = make_target(args.target, args.package)

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except Exception as exc:  # the targets return on an MmedgeError; this is a second guard
            if not _is_mmedge_error(exc):
                raise  # a finding: libFuzzer prints it, saves the input as crash-<sha1> and stops
        # Peak RSS only grows, so the first input past the limit is the one that allocated (libFuzzer's
        # own -rss_limit_mb samples once a second and misses a spike that is freed in time).
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        if peak_mb > args.max_rss_mb:
            raise MemoryError(
                f"peak RSS reached {peak_mb} MB on this {len(data)}-byte input (--max-rss-mb {args.max_rss_mb})"
            )

    if not any(not a.startswith("-") for a in libfuzzer_args):  # no corpus directory: seed a temporary one
        corpus = Path(tempfile.mkdtemp(prefix=f"mmedge-corpus-{args.target}-"))
        for i, seed in enumerate(seeds(args.target, args.package)):
            (corpus / f"seed-{i}").write_bytes(seed)
        libfuzzer_args.append(str(corpus))
    atheris.Setup([argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv)
