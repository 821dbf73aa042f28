"""Strict config parsing shared by the families: unknown keys and wrong arguments are ConfigErrors."""

from __future__ import annotations

import math
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
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in d and isinstance(f.default, (int, float)):
            _check_number(f.name, d[f.name], f.default, where)
    try:
        return cls(**d)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_number(name: str, value: Any, default: int | float | bool, where: str) -> None:
    """Numbers in a config must have the default's kind and not be negative (sizes, counts, rates)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        kind = (
            "true/false"
            if isinstance(default, bool)
            else ("an int >= 0" if isinstance(default, int) else "a number")
        )
        raise ConfigError(f"{where}: {name} must be {kind}, got {value!r}")
