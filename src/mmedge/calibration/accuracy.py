"""How close a quantized model stays to its fp32 source: per-output cosine similarity under ORT CPU."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mmedge.builds.sessions import ort_session, run_outputs
from mmedge.errors import InvalidInputError
from mmedge.runtime.metrics import row_cosine


def compare_outputs(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-output mean row cosine between two `run_outputs` results."""
    missing = sorted(set(ref) - set(out))
    if missing:
        raise InvalidInputError(f"quantized model lacks outputs {missing}; it must keep the fp32 outputs")
    return {name: row_cosine(ref[name], out[name]) for name in ref}


def output_cosine(
    fp32_path: Path,
    q_path: Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    threads: int = 2,
) -> dict[str, float]:
    """Mean per-sample cosine similarity of each output, fp32 vs quantized, both run with ORT CPU."""
    ref = run_outputs(ort_session(Path(fp32_path), threads), feeds)
    out = run_outputs(ort_session(Path(q_path), threads), feeds)
    return compare_outputs(ref, out)
