"""Deterministic sample inputs for a component's declared inputs: export parity, build checks, benchmarks.

One generator for every caller. Integer inputs with a declared range take random values in it;
without one, the conventional tensors get what a real call passes (`position_ids` 0..n-1,
`attention_mask` ones, others zeros); `input_ids` is a tokenised sample caption when a tokenizer is
given; floats are standard normal noise. Symbolic dims take `sizes`, else the declared `opt` value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from mmedge.runtime.manifest import DimRange, TensorSpec

if TYPE_CHECKING:
    from mmedge.runtime.manifest import ComponentEntry
    from mmedge.runtime.package import Package
    from mmedge.runtime.texts import TextTokenizer

SAMPLE_TEXT = "a small red circle at the top left and a large blue square in the center"


def sample_feeds(
    inputs: Sequence[TensorSpec],
    dims: Mapping[str, DimRange],
    int_ranges: Mapping[str, tuple[int, int]] | None = None,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    tokenizer: TextTokenizer | None = None,
) -> dict[str, np.ndarray]:
    """Named arrays for `inputs`, shaped by `dims` (and `sizes`), reproducible from `seed`."""
    ranges = int_ranges or {}
    known = {d: r.opt for d, r in dims.items()} | dict(sizes or {})
    feeds: dict[str, np.ndarray] = {}
    ids_spec = next((s for s in inputs if s.name == "input_ids"), None)
    if tokenizer is not None and ids_spec is not None:
        batch = (
            known.get(str(ids_spec.shape[0]), 1) if isinstance(ids_spec.shape[0], str) else ids_spec.shape[0]
        )
        length = ids_spec.shape[1]
        if isinstance(length, int):  # a graph of one text length (Stable Diffusion's text encoder)
            ids = tokenizer.encode_padded([SAMPLE_TEXT] * int(batch), length)
        else:
            ids, _ = tokenizer.encode_batch([SAMPLE_TEXT] * int(batch))
            known[length] = ids.shape[1]
        feeds["input_ids"] = ids.astype(ids_spec.dtype)
    rng = np.random.default_rng(seed)
    for spec in inputs:
        if spec.name in feeds:
            continue
        shape = tuple(known[d] if isinstance(d, str) else d for d in spec.shape)
        if spec.dtype.startswith("float"):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.name in ranges:
            low, high = ranges[spec.name]
            feeds[spec.name] = rng.integers(low, high, size=shape).astype(spec.dtype)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones(shape, spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, spec.dtype)
    return feeds


def sample_inputs(pkg: Package, entry: ComponentEntry) -> list[dict[str, np.ndarray]]:
    """Inputs a component takes (batch 2, symbolic dims at their opt, integer inputs in range, real
    token ids where it reads text): what builds and converted graphs are compared on."""
    from mmedge.runtime.components import package_tokenizer

    text = package_tokenizer(pkg) if entry.input("input_ids") is not None and pkg.manifest.tokenizer else None
    return [sample_feeds(entry.inputs, entry.dims, entry.int_ranges, sizes={"batch": 2}, tokenizer=text)]


def relative_error(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> float:
    """The largest output error relative to that output's largest magnitude."""
    return max(
        float(np.abs(out[k].astype(np.float64) - v).max() / max(np.abs(v).max(), 1e-12))
        for k, v in ref.items()
    )
