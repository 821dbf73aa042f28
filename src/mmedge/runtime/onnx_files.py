"""A package's ONNX files: what verification checks in them, and the only bytes a backend is given.

One walk reaches every node and tensor a model holds: the graph, every subgraph, model-local
functions, training graphs, initializers, sparse initializers and tensor attributes. Verification
(`check_model`) uses it to refuse external data outside the package's listed files, operators
mmedge never produces, and sizes that a constant in the graph makes huge. Loading (`read_model`)
uses it to fill every external tensor in from bytes hashed as they are read, so a backend gets a
self-contained model in memory and never opens a file by name: ONNX Runtime would resolve a
location against the current directory, not the package.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from mmedge.errors import IntegrityError, UnsupportedError
from mmedge.runtime.manifest import FileEntry, Manifest, check_relpath

if TYPE_CHECKING:
    from onnx import GraphProto, ModelProto, NodeProto, TensorProto

EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum"})
# Largest tensor a node may build from sizes that are constants in the graph (ConstantOfShape,
# Expand, Tile, Range): 2**26 elements is 256 MiB of float32, far above what a model's own
# masks and position tables need.
MAX_STATIC_ELEMENTS = 1 << 26
PROTOBUF_LIMIT = (1 << 31) - 1  # a serialised ModelProto must stay below 2 GiB


# --- reading bytes that match the manifest ---------------------------------------------------------


def read_listed(root: Path, rel: str, entry: FileEntry) -> bytes:
    """The bytes of a listed file, read once and checked against its size and sha256 right then.

    What a caller parses is what was hashed: a file swapped after verification is refused here.
    Not-regular files (a FIFO would block) and symlinks at the last component are refused before
    reading; the size is checked before the bytes are read, so a grown file costs nothing."""
    check_relpath(rel)
    altered = f"{rel}: sha256 differs from the manifest; the file was altered"
    try:
        fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise IntegrityError(f"{rel}: cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            raise IntegrityError(altered)
        data = f.read(entry.size + 1)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise IntegrityError(altered)
    return data


def onnx_files(manifest: Manifest) -> list[str]:
    """Every listed file that is an ONNX model, whatever its name: component precisions, ORT builds
    and any `.onnx` file. (A file is checked by what it is used as, not by its extension.)"""
    used = {p.file for c in manifest.components.values() for p in c.precisions.values()}
    used |= {f for e in manifest.engines.values() if e.backend == "ort" for f in e.files.values()}
    used |= {rel for rel in manifest.files if rel.endswith(".onnx")}
    return sorted(used)


def parse_model(data: bytes, rel: str) -> ModelProto:
    """Parse ONNX bytes (no external data is touched)."""
    import onnx

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises several types on corrupt bytes
        raise IntegrityError(f"{rel}: not a readable ONNX model ({type(exc).__name__})") from None
    return model


# --- one walk over everything a model holds --------------------------------------------------------


def _subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    # Read every field, whatever the attribute's declared type says: a runtime may read either.
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def iter_graphs(model: ModelProto) -> Iterator[GraphProto]:
    """The main graph, training graphs and every subgraph, including those inside functions."""
    todo = [model.graph]
    for info in model.training_info:
        todo += [info.initialization, info.algorithm]
    for fn in model.functions:
        for node in fn.node:
            todo.extend(_subgraphs(node))
    while todo:  # a stack, not recursion: nesting depth is the file's choice
        graph = todo.pop()
        yield graph
        for node in graph.node:
            todo.extend(_subgraphs(node))


def iter_nodes(model: ModelProto) -> Iterator[NodeProto]:
    """Every node of every graph and model-local function."""
    for graph in iter_graphs(model):
        yield from graph.node
    for fn in model.functions:
        yield from fn.node


def iter_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every tensor that can carry data: initializers, sparse initializers and tensor attributes."""
    for graph in iter_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in iter_nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            sparse_attrs = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
            for sparse in [*sparse_attrs, *attr.sparse_tensors]:
                yield sparse.values
                yield sparse.indices


# --- verification ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExternalRef:
    location: str  # package-relative, listed
    offset: int
    length: int  # -1: to the end of the file


def external_ref(tensor: TensorProto, rel: str, files: Mapping[str, FileEntry]) -> ExternalRef:
    """Where an external tensor's bytes are: a listed file, inside its bounds; else IntegrityError."""
    info = {e.key: e.value for e in tensor.external_data}
    unknown = set(info) - EXTERNAL_KEYS
    if unknown:
        raise IntegrityError(f"{rel}: external data of {tensor.name!r} has unknown keys {sorted(unknown)}")
    base = PurePosixPath(rel).parent
    loc = (base / check_relpath(info.get("location", ""), "external data location")).as_posix()
    if loc not in files:
        raise IntegrityError(f"{rel}: external data file {loc!r} is not listed in the manifest")
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
    except ValueError:
        raise IntegrityError(
            f"{rel}: external data offset/length of {tensor.name!r} are not integers"
        ) from None
    if offset < 0 or length < -1 or offset + max(length, 0) > files[loc].size:
        raise IntegrityError(f"{rel}: external data of {tensor.name!r} points outside {loc!r}")
    return ExternalRef(loc, offset, length)


def check_model(model: ModelProto, rel: str, files: Mapping[str, FileEntry]) -> None:
    """Opsets, IR version, operators, static sizes and every external-data reference of one model."""
    import onnx

    from mmedge.runtime.opsets import ALLOWED_OPS, max_supported_opset

    limit = max_supported_opset()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > limit:
            raise UnsupportedError(
                f"{rel}: opset {imp.version} is newer than this runtime supports ({limit})"
            )
    if model.ir_version > onnx.IR_VERSION:
        raise UnsupportedError(
            f"{rel}: IR version {model.ir_version} is newer than supported ({onnx.IR_VERSION})"
        )
    if len(model.functions):
        raise UnsupportedError(
            f"{rel}: model-local functions ({model.functions[0].name!r}) are not supported; "
            "mmedge's exports and builds never produce them"
        )
    for node in iter_nodes(model):
        domain = "" if node.domain == "ai.onnx" else node.domain
        if node.op_type not in ALLOWED_OPS.get(domain, ()):
            raise UnsupportedError(
                f"{rel}: operator {domain + '.' if domain else ''}{node.op_type} (node {node.name!r}) is not "
                "one mmedge's exports and builds produce; the package is refused"
            )
    for tensor in iter_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external_ref(tensor, rel, files)
    for graph in iter_graphs(model):
        _check_static_sizes(graph, rel)


def _constants(graph: GraphProto) -> dict[str, np.ndarray]:
    """Small constant integer/float tensors of a graph (initializers and Constant nodes), by name."""
    from onnx import TensorProto, numpy_helper

    found: dict[str, np.ndarray] = {}
    small = [(t.name, t) for t in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    small.append((node.output[0], attr.t))
                elif attr.name in ("value_int", "value_float"):
                    found[node.output[0]] = np.array(attr.i if attr.name == "value_int" else attr.f)
                elif attr.name in ("value_ints", "value_floats"):
                    found[node.output[0]] = np.array(attr.ints if attr.name == "value_ints" else attr.floats)
    for name, t in small:
        if t.data_location != TensorProto.EXTERNAL and math.prod(t.dims) <= 64:
            try:
                found[name] = numpy_helper.to_array(t)
            except Exception:  # malformed data: ONNX Runtime will refuse it when it loads the graph
                continue
    return found


def _check_static_sizes(graph: GraphProto, rel: str) -> None:
    """Refuse nodes whose output size is fixed by constants and huge (a 300-byte graph asking for
    gigabytes). Sizes computed at run time are bounded by the run deadline and the input checks."""
    consts = _constants(graph)

    def const(node: NodeProto, i: int) -> np.ndarray | None:
        return consts.get(node.input[i]) if len(node.input) > i else None

    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        elements: float | None = None
        if node.op_type in ("ConstantOfShape", "Expand", "Tile"):
            sizes = const(node, 0 if node.op_type == "ConstantOfShape" else 1)
            if sizes is not None:
                elements = math.prod(abs(float(v)) for v in sizes.ravel())
        elif node.op_type == "Range":
            args = [const(node, i) for i in range(3)]
            if all(a is not None and a.size == 1 for a in args):
                start, limit, delta = (float(a.ravel()[0]) for a in args if a is not None)
                if delta == 0 or not all(math.isfinite(v) for v in (start, limit, delta)):
                    elements = math.inf
                else:
                    elements = max(math.ceil((limit - start) / delta), 0)
        if elements is not None and elements > MAX_STATIC_ELEMENTS:
            raise IntegrityError(
                f"{rel}: node {node.name!r} ({node.op_type}) would build {elements:.3g} elements from "
                f"constants; the limit is {MAX_STATIC_ELEMENTS}"
            )


# --- the bytes a backend is given ------------------------------------------------------------------


@dataclass
class VerifiedModel:
    """A self-contained model: `model` is a serialised ModelProto without external references.

    Above protobuf's 2 GiB limit the largest top-level initializers travel in `initializers`
    (arrays over verified bytes), and the model keeps a placeholder reference for each, which the
    backend must replace by name before anything is read (ONNX Runtime's add_external_initializers)."""

    model: bytes
    initializers: dict[str, np.ndarray] = field(default_factory=dict)


IN_MEMORY = "mmedge-in-memory"  # placeholder location of an initializer handed over in `initializers`


def has_external_data(model: ModelProto) -> bool:
    """Whether any tensor of the model keeps its bytes in another file."""
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensors(model))


# name -> [package-relative file, offset, length, numpy dtype, dims]
ExternalTable = dict[str, list[Any]]


def external_table(model: ModelProto, rel: str, files: Mapping[str, FileEntry]) -> ExternalTable | None:
    """Where each external tensor's bytes are, when every one is a top-level initializer that a
    backend can be handed as an array (else None: the tensors are filled into the model instead)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    external = [t for t in iter_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    top = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if len(external) != len(top) or len({t.name for t in top}) != len(top):
        return None
    table: ExternalTable = {}
    for tensor in top:
        ref = external_ref(tensor, rel, files)
        try:
            dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
        except (KeyError, TypeError, ValueError):
            return None
        nbytes = math.prod(tensor.dims) * dtype.itemsize
        length = files[ref.location].size - ref.offset if ref.length < 0 else ref.length
        if dtype.kind not in "biuf" or length != nbytes:
            return None
        table[tensor.name] = [ref.location, ref.offset, length, dtype.str, list(tensor.dims)]
    return table


def _arrays(root: Path, manifest: Manifest, table: ExternalTable, rel: str) -> dict[str, np.ndarray]:
    """The external initializers as arrays over their files' bytes, each file read once and hashed
    as it is read: the arrays are views, not copies."""
    blobs: dict[str, np.ndarray] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, (location, offset, length, dtype, dims) in table.items():
        if location not in manifest.files:
            raise IntegrityError(f"{rel}: external data file {location!r} is not listed in the manifest")
        if location not in blobs:
            blobs[location] = np.frombuffer(read_listed(root, location, manifest.files[location]), np.uint8)
        blob = blobs[location]
        if offset + length > blob.size:
            raise IntegrityError(f"{rel}: external data of {name!r} points outside {location!r}")
        arrays[name] = blob[offset : offset + length].view(np.dtype(dtype)).reshape(dims)
    return arrays


def read_model(
    root: Path, manifest: Manifest, rel: str, check: bool = True, inline: bool = False
) -> VerifiedModel:
    """Read `rel` and the external data it names from bytes hashed as they are read, and return a
    model that needs no file: external top-level initializers travel as arrays over the verified
    bytes (the backend replaces them by name before anything would be opened), any other external
    tensor is filled into the model.

    With `check`, the model passes `check_model` first, unless the same bytes passed it here before
    (`check_records`): then the verified bytes go to the backend unparsed, and the record says
    where its external initializers are. (`check=False`: `verify_package` has just checked them.)
    `inline` fills every external tensor into the model, for a backend that parses one blob."""
    from mmedge.runtime import check_records

    entry = manifest.files[rel]
    raw = read_listed(root, rel, entry)
    table = check_records.checked_table(entry.sha256)
    if table is not None and (not inline or not table):
        return VerifiedModel(raw, _arrays(root, manifest, table, rel))
    model = parse_model(raw, rel)
    if table is None:
        if check:
            check_model(model, rel, manifest.files)
        table = external_table(model, rel, manifest.files) if has_external_data(model) else {}
        if check and table is not None:
            check_records.record_checked(entry.sha256, table)
    if table is not None and (not inline or not table):
        return VerifiedModel(raw, _arrays(root, manifest, table, rel))  # the bytes as hashed
    del raw
    import onnx

    data: dict[str, bytes] = {}
    external = [t for t in iter_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        ref = external_ref(tensor, rel, manifest.files)
        if ref.location not in data:
            data[ref.location] = read_listed(root, ref.location, manifest.files[ref.location])
        blob = data[ref.location]
        end = len(blob) if ref.length < 0 else ref.offset + ref.length
        tensor.raw_data = blob[ref.offset : end]
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    out = VerifiedModel(b"")
    if model.ByteSize() >= PROTOBUF_LIMIT:
        _move_out_largest(model, out, rel)
    out.model = model.SerializeToString()
    return out


def _move_out_largest(model: Any, out: VerifiedModel, rel: str) -> None:
    """Hand the largest top-level initializers over as arrays until the model fits in protobuf."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    for tensor in sorted(model.graph.initializer, key=lambda t: -len(t.raw_data)):
        if model.ByteSize() < PROTOBUF_LIMIT:
            return
        if not tensor.raw_data:
            break
        try:
            dtype = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
            array = np.frombuffer(tensor.raw_data, dtype).reshape(tuple(tensor.dims))
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{rel}: initializer {tensor.name!r} has malformed data") from None
        out.initializers[tensor.name] = array  # over a bytes copy: the protobuf's own is cleared below
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", IN_MEMORY
    if model.ByteSize() >= PROTOBUF_LIMIT:
        raise UnsupportedError(f"{rel}: the graph is over 2 GiB without its initializers")
