"""Backend builds of a package: ORT-optimized graphs and TensorRT engines, recorded in the engine table.

`BUILDERS` maps each backend of `runtime.backends.BACKENDS` to its builder; builders are imported
when first made (TensorRT is optional).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from mmedge.errors import UnsupportedError
from mmedge.runtime.backends import BACKENDS

if TYPE_CHECKING:
    from mmedge.builds.base import Builder

BUILDERS: dict[str, str] = {
    "ort": "mmedge.builds.ort_builder:OrtBuilder",
    "tensorrt": "mmedge.builds.tensorrt:TensorRTBuilder",
}


def make_builder(name: str) -> Builder:
    """The builder of backend `name`, or an UnsupportedError listing the backends that build."""
    if name not in BUILDERS or name not in BACKENDS:
        raise UnsupportedError(
            f"backend {name!r} is not supported; choose from {sorted(set(BUILDERS) & set(BACKENDS))}"
        )
    module, cls = BUILDERS[name].split(":")
    builder: Builder = getattr(importlib.import_module(module), cls)()
    return builder
