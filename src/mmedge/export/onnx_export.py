"""torch -> ONNX for one declared component, with dynamic dims and external data past 2 GB."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from mmedge.export.graph_simplify import simplify
from mmedge.export.model_files import needs_external_data, save_model
from mmedge.models.component import ComponentDecl
from mmedge.runtime.feeds import sample_feeds
from mmedge.runtime.manifest import TensorSpec

DEFAULT_OPSET = 17


def example_inputs(
    decl: ComponentDecl, sizes: dict[str, int] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Sample inputs matching the declaration (`runtime.feeds.sample_feeds`)."""
    return sample_feeds(decl.inputs, decl.dims, decl.int_ranges, sizes=sizes, seed=seed)


def _dynamic_axes(specs: tuple[TensorSpec, ...]) -> dict[str, dict[int, str]]:
    return {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs}


def export_component(
    model: torch.nn.Module, decl: ComponentDecl, out_path: Path, opset: int = DEFAULT_OPSET
) -> list[Path]:
    """Export `decl` of `model` to `out_path`; returns the files written (model + external data)."""
    import onnx

    module = decl.build(model).eval()
    feeds = example_inputs(decl)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in decl.inputs)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.inference_mode():
            torch.onnx.export(
                module,
                args,
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=[s.name for s in decl.inputs],
                output_names=[s.name for s in decl.outputs],
                dynamic_axes={**_dynamic_axes(decl.inputs), **_dynamic_axes(decl.outputs)},
                do_constant_folding=True,
            )
        proto = onnx.load(str(raw))  # pulls any external data torch wrote into memory
    proto.producer_name = "mmedge"
    simplify(proto)
    save_model(proto, out_path)
    return (
        [out_path, out_path.with_name(out_path.name + ".data")] if needs_external_data(proto) else [out_path]
    )
