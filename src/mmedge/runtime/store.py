"""The local model store: packages under $MMEDGE_HOME (default ~/.cache/mmedge)."""

from __future__ import annotations

import os
from pathlib import Path

from mmedge.errors import ModelNotFoundError
from mmedge.runtime.manifest import MANIFEST_NAME


def model_home() -> Path:
    """Directory of the model store."""
    return Path(os.environ.get("MMEDGE_HOME") or Path.home() / ".cache" / "mmedge").expanduser()


def list_packages() -> list[str]:
    """Names of the packages in the store (hidden staging directories excluded)."""
    home = model_home()
    if not home.is_dir():
        return []
    return sorted(
        p.name for p in home.iterdir() if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
    )


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A package path as given, or a name in the store; otherwise an error listing what exists."""
    p = Path(name_or_path).expanduser()
    if (p / MANIFEST_NAME).is_file():
        return p
    if p.is_dir() and (isinstance(name_or_path, os.PathLike) or "/" in str(name_or_path) or p.is_absolute()):
        raise ModelNotFoundError(f"{str(p)!r} has no {MANIFEST_NAME}: it is not a model package")
    if isinstance(name_or_path, str) and "/" not in name_or_path and name_or_path not in ("", ".", ".."):
        q = model_home() / name_or_path
        if (q / MANIFEST_NAME).is_file():
            return q
    have = list_packages()
    hint = (
        f"packages in {model_home()}: {', '.join(have)}"
        if have
        else f"the store {model_home()} is empty; run `mmedge demo` or `mmedge export`"
    )
    raise ModelNotFoundError(f"no model package {str(name_or_path)!r}; {hint}")
