"""Open and verify a model package directory before any runtime sees its files (torch-free).

Verification covers: the manifest schema, every listed file's size and sha256, that files
are regular files inside the package (no symlinks, no hard links), and every ONNX
external-data reference (relative, listed, offset/length inside the file, known keys).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmedge.errors import IntegrityError, UnsupportedError
from mmedge.runtime.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath, parse_manifest

if TYPE_CHECKING:
    from mmedge.runtime.signing import TrustPolicy

_CHUNK = 1 << 20
_EXTERNAL_KEYS = {"location", "offset", "length", "checksum"}


def sha256_file(path: str | os.PathLike) -> str:
    """Stream a file through sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Package:
    """A verified package: its root and manifest. Only build through `open_package`."""

    root: Path
    manifest: Manifest

    def path(self, rel: str) -> Path:
        """Absolute path of a file the manifest lists; anything unlisted is refused."""
        if rel not in self.manifest.files:
            raise IntegrityError(f"{rel!r} is not listed in the manifest of {self.root}")
        return self.root / check_relpath(rel)


def _regular_file_inside(root: Path, rel: str) -> os.stat_result:
    check_relpath(rel)
    p = root / rel
    # Walk every component so a symlinked directory cannot redirect a path outside.
    cur = root
    for part in Path(rel).parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            raise IntegrityError(f"package file {rel!r} is missing") from None
        if stat.S_ISLNK(st.st_mode):
            raise IntegrityError(f"package path {rel!r} goes through a symlink; symlinks are refused")
    st = os.lstat(p)
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"package path {rel!r} is not a regular file")
    if st.st_nlink > 1:
        raise IntegrityError(f"package file {rel!r} has {st.st_nlink} hard links; hard links are refused")
    return st


def _manifest_bytes(root: Path) -> bytes:
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise IntegrityError(f"{root} is not a package directory")
    if mpath.is_symlink() or not mpath.is_file():
        raise IntegrityError(f"{root} has no {MANIFEST_NAME} (or it is not a regular file)")
    return mpath.read_bytes()


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read and strictly parse a package's manifest without hashing its files."""
    return parse_manifest(_manifest_bytes(Path(root)))


def verify_package(
    root: str | os.PathLike, check_onnx: bool = True, trust: TrustPolicy | None = None
) -> Package:
    """Verify a package completely and return it; raise IntegrityError on the first problem.

    `trust` (default: hashes only) may also require a signature; it is checked on the same manifest
    bytes that are then parsed, so the manifest cannot change between the two."""
    root = Path(root).resolve()
    raw = _manifest_bytes(root)
    if trust is not None:
        trust.check(root, raw)
    manifest = parse_manifest(raw)
    for rel, entry in manifest.files.items():
        st = _regular_file_inside(root, rel)
        if st.st_size != entry.size:
            raise IntegrityError(f"{rel}: size {st.st_size} differs from the manifest's {entry.size}")
        if sha256_file(root / rel) != entry.sha256:
            raise IntegrityError(f"{rel}: sha256 differs from the manifest; the file was altered")
    if check_onnx:
        for rel in manifest.files:
            if rel.endswith(".onnx"):
                check_onnx_file(root, rel, manifest.files)
    return Package(root, manifest)


def check_onnx_file(root: Path, rel: str, files: Mapping[str, FileEntry]) -> None:
    """Check opsets against the installed runtime and every external-data reference (which must
    point inside a file listed in `files`, the manifest's hashed files)."""
    import onnx  # base dependency; parsing only, no execution

    from mmedge.runtime.opsets import max_supported_opset

    try:
        model = onnx.load(str(root / rel), load_external_data=False)
    except Exception as exc:  # protobuf raises several types on corrupt bytes
        raise IntegrityError(f"{rel}: not a readable ONNX model ({type(exc).__name__})") from None
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
    base = Path(rel).parent
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        unknown = set(info) - _EXTERNAL_KEYS
        if unknown:
            raise IntegrityError(
                f"{rel}: external data of {tensor.name!r} has unknown keys {sorted(unknown)}"
            )
        loc = (base / check_relpath(info.get("location", ""), "external data location")).as_posix()
        if loc not in files:
            raise IntegrityError(f"{rel}: external data file {loc!r} is not listed in the manifest")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise IntegrityError(
                f"{rel}: external data offset/length of {tensor.name!r} are not integers"
            ) from None
        size = files[loc].size
        if offset < 0 or length < -1 or offset + max(length, 0) > size:
            raise IntegrityError(f"{rel}: external data of {tensor.name!r} points outside {loc!r}")


def _all_tensors(graph: Any) -> Iterator[Any]:  # onnx protobuf types
    """Initializers and tensor attributes of this graph and every subgraph."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)
