"""Property tests (hypothesis, bounded): hostile bytes and values only ever raise typed mmedge errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmedge.errors import IntegrityError, InvalidInputError, MmedgeError
from mmedge.runtime.images import ImageLimits, load_image
from mmedge.runtime.manifest import MANIFEST_NAME, parse_manifest

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@FAST
@given(st.binary(max_size=2000))
def test_manifest_parser_bytes(data: bytes) -> None:
    try:
        parse_manifest(data)
    except IntegrityError:
        pass


@FAST
@given(
    path=st.lists(
        st.sampled_from(
            [
                "files",
                "components",
                "vision",
                "precisions",
                "fp32",
                "dims",
                "batch",
                "min",
                "inputs",
                "engines",
                "tokenizer",
                "file",
            ]
        ),
        min_size=1,
        max_size=4,
    ),
    value=JSON,
)
def test_manifest_parser_mutations(tiny_pkg_session: Path, path: list[str], value: object) -> None:
    """Replace one nested value of a real manifest with arbitrary JSON: parse or IntegrityError."""
    raw = json.loads((tiny_pkg_session / MANIFEST_NAME).read_text())
    node = raw
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            break
        node = node[key]
    if isinstance(node, dict):
        node[path[-1]] = value
    try:
        parse_manifest(json.dumps(raw))
    except IntegrityError:
        pass


@FAST
@given(st.binary(max_size=4000))
def test_image_loader_bytes(data: bytes) -> None:
    try:
        out = load_image(data, limits=ImageLimits(max_pixels=1_000_000))
    except InvalidInputError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


@FAST
@given(st.binary(min_size=8, max_size=200), st.integers(0, 60))
def test_image_loader_corrupted_png(tail: bytes, cut: int) -> None:
    import cv2

    _ok, buf = cv2.imencode(".png", np.full((16, 16, 3), 128, np.uint8))
    data = buf.tobytes()
    data = data[: len(data) - cut] + tail
    try:
        load_image(data)
    except InvalidInputError:
        pass


@FAST
@given(st.lists(st.text(max_size=300), min_size=1, max_size=4))
def test_tokenizer_wrapper(tiny_pkg_session: Path, texts: list[str]) -> None:
    from mmedge.runtime.texts import TextTokenizer

    tok = TextTokenizer.from_file(tiny_pkg_session / "tokenizer.json", context_length=32, pad_id=0)
    try:
        ids, mask = tok.encode_batch(texts)
    except InvalidInputError:
        return
    assert ids.shape == mask.shape and ids.shape[0] == len(texts) and ids.shape[1] <= 32


@FAST
@given(k=st.integers(-5, 50), labels=st.lists(st.text(max_size=12), min_size=0, max_size=5))
def test_request_parameters(tiny_pkg_session: Path, k: int, labels: list[str]) -> None:
    from mmedge import sdk

    p = _pipe(tiny_pkg_session)
    img = np.zeros((32, 32, 3), np.uint8)
    try:
        hits = p.search("a red circle", k=k)
        assert len(hits) <= max(k, 0)
        p.classify(img, labels)
    except MmedgeError:
        pass
    assert sdk is not None


_PIPES: dict[Path, object] = {}


def _pipe(pkg: Path):
    from mmedge import sdk

    if pkg not in _PIPES:
        p = sdk.Pipeline(str(pkg))
        p.add_images([np.full((64, 64, 3), v, np.uint8) for v in (0, 128, 255)])
        _PIPES[pkg] = p
    return _PIPES[pkg]


@FAST
@given(
    location=st.sampled_from(
        ["w.bin", "../w.bin", "/etc/passwd", "sub/../w.bin", "missing.bin", "", "w.bin\x00x"]
    )
    | st.text(max_size=20),
    offset=st.integers(-10, 10**12) | st.text(max_size=5),
    length=st.integers(-10, 10**12) | st.text(max_size=5),
    extra=st.booleans(),
)
def test_external_data_validator(
    tmp_path_factory, location: str, offset: object, length: object, extra: bool
) -> None:
    """Any external-data entry is either inside a listed file or refused before a runtime sees it."""
    import onnx
    from onnx import TensorProto, helper

    from mmedge.runtime.manifest import FileEntry
    from mmedge.runtime.package import check_onnx_file, sha256_file

    root = tmp_path_factory.mktemp("ext")
    (root / "w.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())
    w = TensorProto()
    w.name, w.data_type = "w", TensorProto.FLOAT
    w.dims.extend([16])
    w.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(length)}
    if extra:
        entries["evil"] = "1"
    for k, v in entries.items():
        e = w.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])],
        initializer=[w],
    )
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
        str(root / "m.onnx"),
    )
    files = {
        rel: FileEntry(sha256_file(root / rel), (root / rel).stat().st_size) for rel in ("m.onnx", "w.bin")
    }
    try:
        check_onnx_file(root, "m.onnx", files)
    except IntegrityError:
        return
    # Accepted: then the entry really lies inside the listed file.
    assert location == "w.bin" and not extra
    off, ln = int(offset), int(length)
    assert off >= 0 and off + max(ln, 0) <= 64
