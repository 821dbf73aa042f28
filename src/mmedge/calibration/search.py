"""Calibrate to an accuracy target: quantize everything, and if an output drifts too far from fp32,
keep the most sensitive nodes in float (ranked once by `sensitivity.node_sensitivity`)."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.builds.ort import is_x86
from mmedge.builds.sessions import ort_session, run_outputs
from mmedge.calibration.accuracy import compare_outputs
from mmedge.calibration.qdq import calibration_method, quantizable_nodes, quantize_int8
from mmedge.calibration.sensitivity import node_sensitivity
from mmedge.errors import InvalidInputError
from mmedge.export.model_files import copy_model

log = logging.getLogger(__name__)

SENSITIVITY_FEEDS = 8  # local errors are stable after a handful of samples


@dataclass(frozen=True)
class CalibrationResult:
    """What calibration produced: the manifest's calibration record for one component."""

    method: str
    samples: int
    float_nodes: tuple[str, ...]
    cosine: dict[str, float]
    target: float
    met: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (tuples become lists)."""
        d = asdict(self)
        d["float_nodes"] = list(self.float_nodes)
        d["cosine"] = {k: float(v) for k, v in self.cosine.items()}
        return d


class _Evaluator:
    """Cosine of candidate Q/DQ models against fp32 outputs computed once."""

    def __init__(self, fp32_path: Path, eval_feeds: Sequence[Mapping[str, np.ndarray]], threads: int):
        self.feeds, self.threads = eval_feeds, threads
        self.ref = run_outputs(ort_session(fp32_path, threads), eval_feeds)

    def __call__(self, q_path: Path) -> dict[str, float]:
        # uint8 activations on x86: numerically the same model, but every MatMul takes ORT's integer path.
        sess = ort_session(q_path, self.threads, uint8_activations=is_x86())
        return compare_outputs(self.ref, run_outputs(sess, self.feeds))


def calibrate_to_target(
    fp32_path: Path,
    out_path: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    eval_feeds: Sequence[dict[str, np.ndarray]],
    method: str = "minmax",
    target_cosine: float = 0.99,
    max_float_nodes: int | None = None,
    op_types: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int = 2,
) -> CalibrationResult:
    """Write the INT8 Q/DQ model with the fewest float nodes whose every output meets `target_cosine`."""
    import onnx

    t0 = time.perf_counter()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    calibration_method(method)  # validate before any work
    if not eval_feeds:
        raise InvalidInputError("calibrate_to_target needs at least one evaluation feed dict")
    if not 0.0 <= target_cosine <= 1.0:
        raise InvalidInputError(f"target_cosine must be in [0, 1], got {target_cosine}")
    candidates = quantizable_nodes(fp32_path, op_types)
    limit = len(candidates) if max_float_nodes is None else max(0, min(int(max_float_nodes), len(candidates)))

    def say(msg: str) -> None:  # to the caller's progress, else to the log: never both
        (progress or log.info)(msg)

    with tempfile.TemporaryDirectory(prefix="mmedge-calib-") as tmp:
        cache = Path(tmp) / "ranges.json"
        evaluate = _Evaluator(fp32_path, eval_feeds, threads)
        tried: dict[int, tuple[Path, dict[str, float]]] = {}

        def attempt(excluded: Sequence[str]) -> dict[str, float]:
            path = Path(tmp) / f"q{len(excluded)}.onnx"
            quantize_int8(fp32_path, path, feeds, method, excluded, op_types, calibration_cache=cache)
            cos = evaluate(path)
            tried[len(excluded)] = (path, cos)
            say(
                f"{len(excluded)} float node(s): worst output cosine {min(cos.values()):.6f} (target {target_cosine})"
            )
            return cos

        def ok(cos: Mapping[str, float]) -> bool:
            return min(cos.values()) >= target_cosine

        say(
            f"calibrating {fp32_path.name} ({method}, {len(feeds)} feeds, {len(candidates)} quantizable nodes)"
        )
        cos = attempt(())
        order: list[str] = []
        best = 0
        if not ok(cos) and limit > 0:
            say("target missed; ranking node sensitivity")
            scores = node_sensitivity(
                onnx.load(str(fp32_path)),
                onnx.load(str(tried[0][0])),
                candidates,
                eval_feeds[:SENSITIVITY_FEEDS],
                threads,
            )
            order = sorted(scores, key=lambda n: -scores[n])
            for name in order[:5]:
                say(f"  sensitive: {name} (noise/signal {scores[name]:.3g})")
            # Exclude the top 1, 2, 4, ... until the target holds, then bisect back down (re-adding nodes).
            lo, k = 0, 1
            best = -1
            while True:
                k = min(k, limit)
                if ok(attempt(order[:k])):
                    best = k
                    break
                lo = k
                if k == limit:
                    break
                k *= 2
            if best > 0:
                hi = best
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if ok(attempt(order[:mid])):
                        hi = mid
                    else:
                        lo = mid
                best = hi
            else:
                best = limit  # target unreachable within max_float_nodes: keep the closest model
        path, cos = tried[best]
        copy_model(path, out_path)  # with its external data, if it has any
    samples = sum(next(iter(f.values())).shape[0] for f in feeds)  # rows, not feed dicts
    result = CalibrationResult(
        method=method,
        samples=samples,
        float_nodes=tuple(order[:best]),
        cosine=dict(cos),
        target=float(target_cosine),
        met=ok(cos),
        seconds=round(time.perf_counter() - t0, 3),
    )
    say(f"done: {len(result.float_nodes)} float node(s), met={result.met}, {result.seconds:.1f}s")
    return result
