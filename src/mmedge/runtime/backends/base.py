"""The backend interface: a backend turns one component file of a package into a Session."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mmedge.runtime.manifest import ComponentEntry
from mmedge.runtime.package import Package


@dataclass(frozen=True)
class SessionOptions:
    """Settings shared by every backend; a backend ignores what it cannot use."""

    threads: int = 0  # 0 = the backend's default
    device: str = "cpu"  # "cpu" | "cuda" | "tensorrt" (ORT execution provider choice)
    # Worker threads busy-wait for the next parallel section (lower latency for back-to-back runs).
    # Off for a component that runs once per request before another one: its spinning threads
    # would take the cores from the next component (BLIP-2's LLM prefill ran 2x slower).
    spin: bool = True
    extra: dict = field(default_factory=dict)


class Session(Protocol):
    """A loaded component, ready to run; must be safe to call from several threads."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on named inputs and return every output by name."""
        ...

    def run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Run with caller-owned buffers: read `feeds` and write each named output into its
        preallocated, C-contiguous array in place (no copies where the backend allows)."""
        ...


class Backend(Protocol):
    name: str

    def load(self, package: Package, component: str, precision: str, options: SessionOptions) -> Session:
        """Load one component at one precision from a verified package."""
        ...


def component_file(package: Package, component: str, precision: str) -> tuple[ComponentEntry, str]:
    """Return the component entry and the package-relative file of one precision, or raise."""
    from mmedge.errors import UnsupportedError

    entry = package.manifest.component(component)
    if precision not in entry.precisions:
        raise UnsupportedError(
            f"component {component!r} has no {precision!r} build; available: {sorted(entry.precisions)}"
        )
    return entry, entry.precisions[precision].file
