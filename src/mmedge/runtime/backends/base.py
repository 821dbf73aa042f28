"""The backend interface: a backend turns one component file of a package into a Session.

What a caller may rely on is stated here, so that the generation loop never duck-types one backend:
every session runs named arrays (`run`, `run_into`) and reports its outputs' declared shapes; a
session that can keep caller-owned buffers bound between calls returns a `Binding` from
`binding()` (ONNX Runtime's IOBinding), one that cannot returns None; a session on device memory
returns a `DeviceCache` from `device_cache()` (TensorRT), one on host memory returns None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from mmedge.errors import UnsupportedError
from mmedge.runtime.manifest import ComponentEntry
from mmedge.runtime.package import Package

DEFAULT_RUN_DEADLINE_S = 300.0


@dataclass(frozen=True)
class SessionOptions:
    """Settings shared by every backend; a backend ignores what it cannot use."""

    threads: int = 0  # 0 = the backend's default
    device: str = "cpu"  # "cpu" | "cuda" | "tensorrt" (ORT execution provider choice)
    # Worker threads busy-wait for the next parallel section (lower latency for back-to-back runs).
    # Off for a component that runs once per request before another one: its spinning threads
    # would take the cores from the next component (BLIP-2's LLM prefill ran 2x slower).
    spin: bool = True
    # Longest one run of a component may take before it is cancelled (DeadlineExceededError);
    # None: no deadline. A hostile graph can loop or compute for ever; no mmedge model needs minutes.
    run_deadline_s: float | None = DEFAULT_RUN_DEADLINE_S
    extra: dict[str, Any] = field(default_factory=dict)


class Binding(Protocol):
    """Buffers bound to a session once and reused across runs (read and written in place)."""

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """(Re)bind these names to these C-contiguous arrays; other names keep their binding."""
        ...

    def run(self) -> None:
        """Run the session on the bound buffers."""
        ...


class DeviceCache(Protocol):
    """A decoder's KV cache kept in a backend's device memory across steps (TensorRT): a step moves
    its own inputs, its logits and its new entries, never the cache."""

    version: int  # the host cache's `version` last uploaded

    def load(self, buffers: list[np.ndarray], version: int) -> None:
        """Upload the whole host cache (first use, and after the host reordered or refilled it)."""
        ...

    def step(
        self,
        feeds: dict[str, np.ndarray],
        fixed: dict[str, np.ndarray],
        logits: np.ndarray,
        new: list[np.ndarray],
        length: int,
    ) -> None:
        """Run over the cached slots [0, length): write `logits` and the new entries `new` into the
        host arrays and append the new entries to the device copy. `fixed` inputs (cross keys and
        values) are uploaded only when another array is passed."""
        ...

    def reorder(self, index: np.ndarray, length: int) -> None:
        """Row i becomes row `index[i]` in the device copy (as `KVCache.reorder` does on the host)."""
        ...


class Session(Protocol):
    """A loaded component, ready to run; must be safe to call from several threads."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    # Each output's shape as the loaded graph declares it: ints for fixed dims, strings or None for
    # symbolic ones. A build may change a contract (an in-place KV cache); this is how callers see it.
    output_shapes: dict[str, tuple[int | str | None, ...]]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on named inputs and return every output by name."""
        ...

    def run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Run with caller-owned buffers: read `feeds` and write each named output into its
        preallocated, C-contiguous array (in place where the backend allows, else copied)."""
        ...

    def binding(self) -> Binding | None:
        """A binding that keeps buffers bound across runs, or None where the backend cannot."""
        ...

    def device_cache(self, past: list[str], present: list[str], shape: tuple[int, ...]) -> DeviceCache | None:
        """A KV cache of `shape` (B, H, T, D) per past input kept in device memory across steps, or
        None for a backend that runs on host memory (the cache is then bound in place)."""
        ...


class Backend(Protocol):
    name: str

    def load(
        self, package: Package, component: str, precision: str, options: SessionOptions, variant: str = ""
    ) -> Session:
        """Load one component at one precision (or a named variant build of it) from a verified package."""
        ...

    def has_build(
        self, package: Package, component: str, precision: str, variant: str, options: SessionOptions
    ) -> bool:
        """Whether the package holds this backend's build of `<component>.<precision>[.<variant>]`."""
        ...


def component_file(package: Package, component: str, precision: str) -> tuple[ComponentEntry, str]:
    """Return the component entry and the package-relative file of one precision, or raise."""
    entry = package.manifest.component(component)
    if precision not in entry.precisions:
        raise UnsupportedError(
            f"component {component!r} has no {precision!r} build; available: {sorted(entry.precisions)}"
        )
    return entry, entry.precisions[precision].file


def build_key(component: str, precision: str, variant: str = "") -> str:
    """The engine-table key of a build: "<component>.<precision>[.<variant>]"."""
    return f"{component}.{precision}" + (f".{variant}" if variant else "")
