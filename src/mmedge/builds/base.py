"""The builder protocol: what `mmedge build` asks of a backend, and the engine-table bookkeeping.

A builder compiles a verified package's component files for its backend into a staging copy of
the package and says what it wrote; `builds.package` records that as one engine-table entry.
`docs/adding-a-backend.md` walks through a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from mmedge.runtime.manifest import ComponentEntry, EngineEntry
from mmedge.runtime.package import Package


@dataclass(frozen=True)
class BuildRequest:
    """One build: the verified package, its staging copy, which precision ("auto" = all) and how."""

    package: Package
    staging: Path  # a full copy of the package; builds are written into it
    precision: str
    threads: int
    say: Callable[[str], None]
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific, e.g. {"prefill": False}


@dataclass(frozen=True)
class BuildResult:
    """What a builder wrote: the engine-table entry (key + fields) and a report per build."""

    target: str  # engine-table key, e.g. "ort1.32.0-cpu" or "sm87-trt10.3-1a2b3c4d"
    version: str
    device: str
    settings: dict[str, Any]
    files: dict[str, str]  # "<component>.<precision>[.<variant>]" -> package-relative path
    report: dict[str, Any]


class Builder(Protocol):
    name: str  # the backend name (runtime.backends.BACKENDS)

    def build(self, request: BuildRequest) -> BuildResult:
        """Build the requested precisions of every component into `request.staging`."""
        ...


def precisions_to_build(entry: ComponentEntry, precision: str) -> list[str]:
    """The precisions of a component that a build request covers ("auto": all it has)."""
    if precision == "auto":
        return sorted(entry.precisions)
    return [precision] if precision in entry.precisions else []


def without_builds_of(tmp: Path, engines: dict[str, EngineEntry], keys: set[str]) -> dict[str, EngineEntry]:
    """The engine table without the builds of `keys` ("<component>.<precision>") and their variants
    ("<component>.<precision>.prefill"), whose files are deleted: a build of old weights must not outlive them."""
    variants = tuple(f"{k}." for k in keys)
    out = {}
    for target, engine in engines.items():
        kept = {}
        for key, rel in engine.files.items():
            if key in keys or key.startswith(variants):
                (tmp / rel).unlink(missing_ok=True)
                (tmp / f"{rel}.data").unlink(missing_ok=True)  # a graph past 2 GB keeps its tensors here
            else:
                kept[key] = rel
        if kept:
            out[target] = replace(engine, files=kept)
    return out
