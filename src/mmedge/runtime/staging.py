"""Crash-safe writes: atomic files and whole-directory swaps.

Export, calibrate and build write into a staging directory next to the target, fsync it,
and swap it into place with one atomic `renameat2(RENAME_EXCHANGE)` (Linux). Whatever moment
the process dies, the target path holds either the complete old or the complete new tree.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from mmedge.errors import InvalidInputError

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
STAGING_MARK = ".mmedge-staging-"


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file via a temp name in the same directory, fsync, then rename over the target."""
    with open_atomic(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A file to write in steps (e.g. JSONL, line by line) that replaces `path` only when the block
    ends without an error: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False when the platform cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        log.debug("renameat2 exchange failed: %s", os.strerror(err))
        return False
    return True


def _commit(tmp: Path, target: Path) -> None:
    _fsync_tree(tmp)
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # tmp now holds the old tree
    else:  # non-Linux fallback: a short window where target is missing, never a mixed tree
        old = target.with_name(f"{STAGING_MARK}old-{target.name}-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    _fsync_dir(target.parent)


def _staging_path(target: Path) -> Path:
    return target.parent / f"{STAGING_MARK}{target.name}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces `target` atomically."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging_path(target)
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_update(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a full copy of `target` to modify; on success it replaces `target` atomically."""
    target = Path(target).absolute()
    with staged_dir(target) as tmp:
        shutil.copytree(
            target,
            tmp,
            symlinks=True,
            dirs_exist_ok=True,
            copy_function=shutil.copy2,
            ignore=lambda d, names: [n for n in names if stat.S_ISLNK(os.lstat(os.path.join(d, n)).st_mode)],
        )
        yield tmp


def check_replaceable(
    target: str | os.PathLike, is_ours: Callable[[Path], bool], what: str, force: bool = False
) -> Path:
    """Refuse, before any work, to replace a folder that holds something other than what we write.

    A staged write replaces the whole target: right for an older package or checkpoint (`is_ours`),
    data loss for anything else. An empty or missing folder is fine; `force` accepts the loss."""
    path = Path(target).expanduser()
    if not path.exists():
        return path
    if not path.is_dir():
        raise InvalidInputError(
            f"{str(path)!r} exists and is not a directory; choose a folder for the {what}"
        )
    if force or is_ours(path) or not any(path.iterdir()):
        return path
    raise InvalidInputError(
        f"{str(path)!r} holds files that are not an mmedge {what}; writing the {what} there would replace "
        "them. Choose a new or empty folder, or pass --force to replace its contents"
    )


def remove_stale_staging(parent: str | os.PathLike) -> list[Path]:
    """Delete staging directories left by killed processes; returns what was removed."""
    removed = []
    for p in Path(parent).glob(f"{STAGING_MARK}*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
