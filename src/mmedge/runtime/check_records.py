"""Which ONNX files this runtime has already checked, by sha256 (docs/bundles.md).

Checking an ONNX file (`onnx_files.check_model`) means parsing it with the `onnx` package: 0.7-0.9 s
to import it on a small CPU, and a copy of the model in memory. The check's outcome depends only on
the file's bytes and on the checker (this mmedge's rules, the installed onnx and onnxruntime), so a
file whose exact bytes passed once, and that needs no other file (no external data), passes again:
its record lets the next load hand the verified bytes to the backend without parsing them.

Records are written only by this runtime, after its own full check, into the local model store
(`$MMEDGE_HOME/.checked/<sha256>.<checker>`), never taken from a package: a package's own claim
that its files were checked would be the attacker's to make. A file is still read and hashed on
every load; a record only spares the parse. Where the store cannot be written, nothing is recorded
and every load parses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from mmedge.runtime.store import model_home

log = logging.getLogger(__name__)

CHECKS_VERSION = 1  # bump when check_model's rules change in a way the fingerprint below misses
RECORDS_DIR = ".checked"


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def checker_id() -> str:
    """A short fingerprint of what a check means here: rules, limits and the installed onnx and
    onnxruntime. A record written under another fingerprint does not count."""
    from mmedge import __version__
    from mmedge.runtime.onnx_files import MAX_STATIC_ELEMENTS
    from mmedge.runtime.opsets import ALLOWED_OPS

    parts = [
        CHECKS_VERSION,
        __version__,
        _dist_version("onnx"),
        _dist_version("onnxruntime") + "/" + _dist_version("onnxruntime-gpu"),
        MAX_STATIC_ELEMENTS,
        sorted((domain, sorted(ops)) for domain, ops in ALLOWED_OPS.items()),
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _record(sha256: str) -> Path:
    return model_home() / RECORDS_DIR / f"{sha256}.{checker_id()}"


def checked_table(sha256: str) -> dict[str, list[Any]] | None:
    """The record of the ONNX file with these bytes, if it passed this checker's full check here:
    where its external initializers are ({} when it has none). None: not checked here."""
    try:
        data = _record(sha256).read_bytes()
        table = json.loads(data) if data else {}
    except (OSError, ValueError):
        return None
    return table if isinstance(table, dict) else None


def record_checked(sha256: str, table: dict[str, list[Any]]) -> None:
    """Remember that the ONNX file with these bytes passed the full check, and where its external
    initializers are (`onnx_files.external_table`, a function of those bytes)."""
    path = _record(sha256)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table) if table else "")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only store: loads keep parsing
        log.debug("cannot record the check of %s: %s", sha256, exc)
