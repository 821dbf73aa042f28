"""Assemble a package in a staging directory: hash every file, write the manifest last."""

from __future__ import annotations

import os
from pathlib import Path

from mmedge.runtime.manifest import MANIFEST_NAME, FileEntry, Manifest
from mmedge.runtime.package import sha256_file
from mmedge.runtime.signing import SIGNATURE_NAME
from mmedge.runtime.staging import write_atomic


def hash_tree(root: Path) -> dict[str, FileEntry]:
    """FileEntry for every regular file under root except the manifest and its signature, keyed by relative POSIX path."""
    entries = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel in (MANIFEST_NAME, SIGNATURE_NAME) or p.is_symlink():  # the signature signs the manifest
                continue
            entries[rel] = FileEntry(sha256_file(p), p.stat().st_size)
    return dict(sorted(entries.items()))


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Re-hash the tree into `manifest.files` and write manifest.json atomically, last."""
    from dataclasses import replace

    final = replace(manifest, files=hash_tree(root))
    write_atomic(root / MANIFEST_NAME, final.to_json())
    return final
