"""Strict JSON <-> frozen dataclass conversion for the manifest and its sections (torch-free).

One mechanism for every section: readers parse with `from_json`, writers build the same dataclasses
and serialise them with `to_json`, so a field cannot be written under one name and read under
another. Unknown keys, missing required keys and values of the wrong type are `IntegrityError`s
naming where they were found. Supported field types: `str`, `int`, `float`, `bool`, `Literal`,
`X | None`, `tuple[X, ...]`, fixed `tuple[X, Y]`, `dict[str, X]`, nested dataclasses, and
`dict[str, Any]` for records the runtime never interprets (reports, provenance).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from mmedge.errors import ConfigError, IntegrityError

T = TypeVar("T")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_json(cls: type[T], value: Any, where: str) -> T:
    """Build dataclass `cls` from parsed JSON, strictly; errors name `where`."""
    return _convert(cls, value, where)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, where)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        for option in inner[:-1]:  # e.g. int | str: the first type that takes the value
            try:
                return _convert(option, value, where)
            except IntegrityError:
                pass
        return _convert(inner[-1], value, where)
    if origin is Literal:
        if value not in get_args(tp) or isinstance(value, bool) != any(
            isinstance(a, bool) for a in get_args(tp)
        ):
            raise IntegrityError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list):
            raise IntegrityError(f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise IntegrityError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_type, value_type = get_args(tp)
        if not isinstance(value, dict):
            raise IntegrityError(f"{where}: expected an object, got {type(value).__name__}")
        return {
            _convert(key_type, k, f"{where} key"): _convert(value_type, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise IntegrityError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise IntegrityError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    raise TypeError(f"schema: unsupported field type {tp!r} at {where}")  # a bug in a section's declaration


def _dataclass(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise IntegrityError(f"{where}: expected an object, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise IntegrityError(f"{where}: unknown keys {unknown}; accepted: {sorted(fields)}")
    required = {
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(value))
    if missing:
        raise IntegrityError(f"{where}: missing keys {missing}")
    hints = _hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except (ConfigError, IntegrityError, ValueError) as exc:  # a section's own checks (__post_init__)
        raise IntegrityError(f"{where}: {exc}") from None


def to_json(obj: Any) -> Any:
    """JSON-ready form of a dataclass tree (tuples become lists; None stays null)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj
