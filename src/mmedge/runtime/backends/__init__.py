"""The backend registry: every place that lists, validates or loads a backend reads `BACKENDS`.

Backends are imported when first made, so naming them costs nothing (ONNX Runtime and TensorRT are
heavy, and TensorRT is optional). `docs/adding-a-backend.md` says what a new one implements.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mmedge.errors import UnsupportedError

if TYPE_CHECKING:
    from mmedge.runtime.backends.base import Backend

# name -> "module:class" of its runtime side (builds/ holds the matching builders)
BACKENDS: dict[str, str] = {
    "ort": "mmedge.runtime.backends.ort:OrtBackend",
    "tensorrt": "mmedge.runtime.backends.tensorrt:TensorRTBackend",
}
DEFAULT_BACKEND = "ort"


def make_backend(name: str) -> Backend:
    """The backend called `name`, or an UnsupportedError listing the known ones."""
    if name not in BACKENDS:
        raise UnsupportedError(f"backend {name!r} is not supported; choose from {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    backend: Backend = getattr(importlib.import_module(module), cls)()
    return backend
