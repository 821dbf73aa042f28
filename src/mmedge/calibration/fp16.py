"""fp16 graphs for GPU targets: each component's fp32 graph with float16 weights and arithmetic.

A strongly typed TensorRT build runs a graph in its own types (`runtime/trt_plan.py`), so FP16 on a
GPU needs an fp16 graph; ONNX Runtime's CUDA and TensorRT providers run the same file. The
conversion is onnxruntime's own (`onnxruntime.transformers.float16`), with the inputs and outputs
kept float32 (a Cast at each end), so the runtime feeds an fp16 graph exactly as its fp32 one. Each
graph's error against fp32 is measured on sample inputs and recorded as its parity. On the CPU the
fp32 (or int8) graphs stay the faster choice: `precision="auto"` skips fp16 there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.manifest import PrecisionEntry
from mmedge.runtime.package import verify_package
from mmedge.runtime.signing import drop_signature, unsigned_note
from mmedge.runtime.staging import staged_update, write_atomic

log = logging.getLogger(__name__)

EXTERNAL_OVER = 1 << 30  # bytes of weights past which the graph is saved with external data


def half_package(
    package: str | Path,
    components: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Add an "fp16" precision to each component (all unless `components`); returns the report
    (per component: file, relative error and cosine against fp32 on sample inputs)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from mmedge.builds.base import without_builds_of
    from mmedge.builds.sessions import ort_session, run_outputs
    from mmedge.export.package_writer import write_manifest
    from mmedge.runtime.feeds import relative_error, sample_inputs
    from mmedge.runtime.store import resolve

    say = progress or log.info
    pkg = verify_package(resolve(package))
    wanted = components or list(pkg.manifest.components)
    if unknown := sorted(set(wanted) - set(pkg.manifest.components)):
        raise InvalidInputError(
            f"components {unknown} are not in the package: {sorted(pkg.manifest.components)}"
        )
    say(f"updating {pkg.root} in place (atomically)")
    report: dict[str, Any] = {}
    with staged_update(pkg.root) as tmp:
        if drop_signature(tmp):
            say(unsigned_note(pkg.root))
        comps = dict(pkg.manifest.components)
        for name in wanted:
            entry = comps[name]
            src_rel = entry.precisions["fp32"].file
            rel = src_rel.replace(".onnx", ".fp16.onnx")
            model = onnx.load(str(tmp / src_rel))  # with its external data, which resolves inside tmp
            half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
            data = half.SerializeToString() if half.ByteSize() < EXTERNAL_OVER else None
            if data is not None:
                write_atomic(tmp / rel, data)
            else:
                onnx.save(half, str(tmp / rel), save_as_external_data=True, location=Path(rel).name + ".data")
            feeds = sample_inputs(pkg, entry)
            ref = run_outputs(ort_session(tmp / src_rel, threads), feeds)
            out = run_outputs(ort_session(tmp / rel, threads), feeds)
            cosine = {
                k: float(
                    np.dot(v.ravel(), out[k].ravel()) / max(np.linalg.norm(v) * np.linalg.norm(out[k]), 1e-30)
                )
                for k, v in ref.items()
            }
            parity = {
                "rel_error_vs_fp32": relative_error(ref, out),
                "cosine_vs_fp32": cosine,
                "samples": sum(len(next(iter(f.values()))) for f in feeds),
            }
            comps[name] = replace(
                entry,
                precisions={**entry.precisions, "fp16": PrecisionEntry(rel, parity, {"method": "fp16"})},
            )
            report[name] = {"file": rel, **parity}
            say(f"{name}.fp16: relative error vs fp32 {parity['rel_error_vs_fp32']:.1e}")
        engines = without_builds_of(tmp, pkg.manifest.engines, {f"{n}.fp16" for n in wanted})
        write_manifest(tmp, replace(pkg.manifest, components=comps, engines=engines))
        verify_package(tmp)
    return {"fp16": report}
