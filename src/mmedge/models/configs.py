"""Strict config parsing shared by the families: unknown keys and wrong arguments are ConfigErrors."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from mmedge.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], d: dict[str, Any], where: str) -> T:
    """Build dataclass `cls` from `d`, naming `where` in any error."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; accepted: {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
