"""Open and verify a model package directory before any runtime sees its files (torch-free).

Verification covers: the manifest schema, every listed file's size and sha256, that files are
regular files inside the package (no symlinks, no hard links), the tokenizer's components
(`tokenizer_policy`), and every ONNX model (`runtime/onnx_files.py`: operators, constant sizes,
external-data references). `verify_package` checks all of it up front; `open_package`, what the
runtime uses, checks the manifest and file metadata and leaves each file's hash and content checks
to the load that uses it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmedge.errors import IntegrityError
from mmedge.runtime.manifest import MANIFEST_NAME, FileEntry, Manifest, check_relpath, parse_manifest

if TYPE_CHECKING:
    from mmedge.runtime.signing import TrustPolicy

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Stream a file through sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Package:
    """An opened package: its root and manifest. Build it with `open_package` (files are checked as
    they are loaded) or `verify_package` (every file checked up front, `checked`)."""

    root: Path
    manifest: Manifest
    checked: bool = False  # every file hashed and every ONNX file checked when it was opened

    def path(self, rel: str) -> Path:
        """Absolute path of a file the manifest lists; anything unlisted is refused."""
        if rel not in self.manifest.files:
            raise IntegrityError(f"{rel!r} is not listed in the manifest of {self.root}")
        return self.root / check_relpath(rel)

    def read_verified(self, rel: str) -> bytes:
        """A listed file's bytes, read once and checked against the manifest's size and sha256 as
        they are read: a caller that parses them parses exactly what was hashed, so a file swapped
        after `verify_package` is refused instead of used."""
        path = self.path(rel)
        entry = self.manifest.files[rel]
        _regular_file_inside(self.root, rel)
        try:
            with open(path, "rb") as f:
                data = f.read(entry.size + 1)  # one byte more shows a file that grew
        except OSError as exc:
            raise IntegrityError(f"cannot read package file {rel!r}: {exc.strerror or exc}") from None
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(f"{rel}: sha256 differs from the manifest; the file was altered")
        return data


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
    from mmedge.runtime import check_records
    from mmedge.runtime.onnx_files import (
        external_table,
        has_external_data,
        onnx_files,
        parse_model,
        read_listed,
    )

    root = Path(root).resolve()
    raw = _manifest_bytes(root)
    if trust is not None:
        trust.check(root, raw)
    manifest = parse_manifest(raw)
    models = set(onnx_files(manifest)) if check_onnx else set()
    for rel, entry in manifest.files.items():
        st = _regular_file_inside(root, rel)
        if st.st_size != entry.size:
            raise IntegrityError(f"{rel}: size {st.st_size} differs from the manifest's {entry.size}")
        if rel in models:  # checked as parsed: the bytes hashed are the bytes checked
            model = parse_model(read_listed(root, rel, entry), rel)
            check_onnx_model(model, rel, manifest.files)
            table = external_table(model, rel, manifest.files) if has_external_data(model) else {}
            if table is not None:
                check_records.record_checked(entry.sha256, table)
        elif sha256_file(root / rel) != entry.sha256:
            raise IntegrityError(f"{rel}: sha256 differs from the manifest; the file was altered")
    package = Package(root, manifest, checked=check_onnx)
    for tok in (manifest.tokenizer, manifest.instruction_tokenizer):
        if tok is not None:  # refuse a hostile tokenizer.json before anything parses it
            from mmedge.runtime.tokenizer_policy import check_tokenizer_json

            check_tokenizer_json(package.read_verified(tok.file), tok.file)
    return package


def open_package(root: str | os.PathLike, trust: TrustPolicy | None = None) -> Package:
    """Open a package for running, checking now only what every use needs; the rest is checked as
    each component loads (docs/bundles.md).

    Now: the manifest (schema, wiring, `trust`'s signature on the same bytes that are parsed), a
    bundle's target against this device, and that every listed file is a regular file inside the
    package with the listed size (no symlinks, no hard links): metadata only, no file is read.
    On load: each file is read once and hashed as it is read (`Package.read_verified`,
    `onnx_files.read_model`), a tokenizer passes `tokenizer_policy` before it is parsed, and an ONNX
    file passes `check_model` before a backend sees it. A swapped or altered file is refused then,
    before any runtime gets its bytes."""
    root = Path(root).resolve()
    raw = _manifest_bytes(root)
    if trust is not None:
        trust.check(root, raw)
    manifest = parse_manifest(raw)
    if manifest.bundle is not None:
        from mmedge.runtime.bundles import check_machine

        check_machine(manifest)
    for rel, entry in manifest.files.items():
        st = _regular_file_inside(root, rel)
        if st.st_size != entry.size:
            raise IntegrityError(f"{rel}: size {st.st_size} differs from the manifest's {entry.size}")
    return Package(root, manifest)


def check_onnx_file(root: Path, rel: str, files: Mapping[str, FileEntry]) -> None:
    """Check one ONNX file of a package (read without its external data): see `check_onnx_model`."""
    from mmedge.runtime.onnx_files import parse_model

    check_onnx_model(parse_model((root / rel).read_bytes(), rel), rel, files)


def check_onnx_model(model: Any, rel: str, files: Mapping[str, FileEntry]) -> None:
    """Opsets, IR version, operators, constant sizes and every external-data reference (which must
    point inside a file listed in `files`, the manifest's hashed files)."""
    from mmedge.runtime.onnx_files import check_model

    check_model(model, rel, files)
