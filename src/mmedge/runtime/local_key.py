"""This installation's secret key, kept in the model store, that authenticates files mmedge wrote itself.

An index directory carries the sha256 of its binary, but whoever supplies the directory can recompute
that. A MAC under this key cannot be forged without the key, so a file with a valid MAC was written
by this installation (or by someone who can read the store, who could also edit the code).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

KEY_NAME = ".local-key"  # hidden: the store's package listing skips dot names
_KEY_BYTES = 32


def key_path() -> Path:
    from mmedge.runtime.store import model_home

    return model_home() / KEY_NAME


def local_key(create: bool = False) -> bytes | None:
    """The key, or None when there is none (or it is not a private file of this user).

    With `create`, a missing key is made: random bytes in a 0600 file, published with one atomic
    link so that concurrent first uses agree on one key. None when the store cannot be written.
    """
    path = key_path()
    key = _read(path)
    if key is not None or not create or path.is_symlink() or path.exists():
        return key
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _create(path)
    except OSError as exc:
        log.warning("cannot create the key %s (%s); indexes are saved without a MAC", path, exc)
        return None
    return _read(path)


def mac(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def mac_ok(key: bytes | None, message: bytes, tag: object) -> bool:
    return key is not None and isinstance(tag, str) and hmac.compare_digest(mac(key, message), tag)


def _read(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symlink (ELOOP), a permission problem
        log.warning("ignoring the key %s: %s", path, exc)
        return None
    try:
        st = os.fstat(fd)
        mine = not hasattr(os, "getuid") or st.st_uid == os.getuid()
        if not stat.S_ISREG(st.st_mode) or not mine or st.st_mode & 0o077 or st.st_size != _KEY_BYTES:
            log.warning("ignoring the key %s: not a private %d-byte file of this user", path, _KEY_BYTES)
            return None
        data = os.read(fd, _KEY_BYTES + 1)
    finally:
        os.close(fd)
    return data if len(data) == _KEY_BYTES else None


def _create(path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            os.write(fd, secrets.token_bytes(_KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces: if another process was first, its key stands
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
