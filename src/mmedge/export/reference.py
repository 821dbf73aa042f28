"""The PyTorch reference of an exported component, rebuilt from the package's recorded source."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mmedge.errors import ConfigError
from mmedge.runtime.manifest import Manifest


def torch_reference(
    manifest: Manifest, component: str, threads: int = 0
) -> Callable[[dict[str, np.ndarray]], Any]:
    """A callable running `component` in eager PyTorch on the same named inputs as the ONNX graph."""
    from mmedge.models.sources import load_source

    src = manifest.provenance.source.get("path")
    if not src:
        raise ConfigError(
            f"package {manifest.name!r} records no source checkpoint to rebuild the reference from"
        )
    lm = load_source(src, family=manifest.family)
    decl = next((d for d in lm.family.components(lm.config) if d.name == component), None)
    if decl is None:
        raise ConfigError(f"family {manifest.family!r} has no component {component!r}")
    module = decl.build(lm.model).eval()
    order = [s.name for s in decl.inputs]
    if threads:
        torch.set_num_threads(threads)

    def run(feeds: dict[str, np.ndarray]) -> Any:
        with torch.inference_mode():
            return module(*(torch.from_numpy(feeds[k]) for k in order))

    return run
