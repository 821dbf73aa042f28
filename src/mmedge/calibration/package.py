"""`mmedge calibrate`: INT8 Q/DQ builds of a package's components, written crash-safely.

Calibration data goes through exactly the runtime's preprocessing (image loading, resize, crop,
normalise; the package's tokenizer), so ranges are measured on what the device will see.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.manifest import Manifest, PrecisionEntry
from mmedge.runtime.package import Package, verify_package
from mmedge.runtime.staging import staged_update, write_atomic

log = logging.getLogger(__name__)
FEED_BATCH = 8  # samples per calibration feed
EVAL_SAMPLES = 32  # extra samples, never used for ranges, that measure the cosine


def _feeds(pkg: Package, kind: str, items: list) -> list[dict[str, np.ndarray]]:  # noqa: ANN001
    from mmedge.runtime.images import PreprocessConfig, load_image, preprocess
    from mmedge.runtime.texts import TextTokenizer

    feeds = []
    if kind == "images":
        pre = PreprocessConfig.from_dict(pkg.manifest.preprocess)
        for i in range(0, len(items), FEED_BATCH):
            arrays = [load_image(it.image) for it in items[i : i + FEED_BATCH]]
            feeds.append({"pixel_values": preprocess(arrays, pre)})
    elif kind == "texts":
        t = pkg.manifest.tokenizer
        tok = TextTokenizer.from_file(pkg.path(t["file"]), context_length=int(t["context_length"]), pad_id=int(t["pad_id"]))
        for i in range(0, len(items), FEED_BATCH):
            ids, mask = tok.encode_batch([it.text for it in items[i : i + FEED_BATCH]])
            feeds.append({"input_ids": ids, "attention_mask": mask})
    else:
        raise InvalidInputError(f"unknown calibration data kind {kind!r}")
    return feeds


def calibrate_package(package: str | Path, data: str, method: str = "minmax", samples: int = 64,
                      target_cosine: float = 0.99, components: list[str] | None = None,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Quantize components to INT8 until each output's cosine vs fp32 meets the target; returns the report."""
    from mmedge.calibration.search import calibrate_to_target
    from mmedge.data import load_data
    from mmedge.export.package_writer import write_manifest
    from mmedge.export.trt_lint import lint_model
    from mmedge.sdk.store import resolve

    say = progress or log.info
    if not 0.0 <= target_cosine <= 1.0:
        raise InvalidInputError(f"--target-cosine must be in [0, 1], got {target_cosine}")
    if samples < 1:
        raise InvalidInputError(f"--samples must be positive, got {samples}")
    pkg = verify_package(resolve(package))
    size = int(pkg.manifest.preprocess.get("image_size", 224))
    items = load_data(data, image_size=size, limit=samples + EVAL_SAMPLES)
    # Samples past the first `samples` measure the cosine; with none left, the calibration set does.
    cal_items, eval_items = items[:samples], items[samples:] or items[:samples]
    wanted = components or list(pkg.manifest.components)
    report: dict[str, Any] = {"data": data, "method": method, "target_cosine": target_cosine, "components": {}}
    with staged_update(pkg.root) as tmp:
        comps = dict(pkg.manifest.components)
        for name in wanted:
            entry = pkg.manifest.component(name)
            kind = entry.calibration_data
            if kind == "none":  # e.g. an LLM: quantized weight-only, without activation calibration
                if components:
                    raise InvalidInputError(f"component {name!r} takes no activation calibration (weight-only)")
                report["components"][name] = {"skipped": "weight-only component"}
                continue
            if kind == "texts" and any(it.text is None for it in items):
                say(f"{name}: {data!r} has no texts; left in fp32")
                report["components"][name] = {"skipped": "no texts in the calibration data"}
                continue
            say(f"calibrate {name} on {len(cal_items)} samples ({method}, target cosine {target_cosine})")
            fp32_rel = entry.precisions["fp32"].file
            int8_rel = fp32_rel.replace(".onnx", ".int8.onnx")
            res = calibrate_to_target(tmp / fp32_rel, tmp / int8_rel, _feeds(pkg, kind, cal_items),
                                      _feeds(pkg, kind, eval_items), method=method, target_cosine=target_cosine,
                                      progress=lambda m: say("  " + m))
            record = {**res.to_dict(), "data": data}
            lint = lint_model(tmp / int8_rel)
            parity = {"cosine_vs_fp32": res.cosine, "trt_lint_ok": lint.ok, "eval_samples": len(eval_items)}
            comps[name] = replace(entry, precisions={**entry.precisions, "int8": PrecisionEntry(int8_rel, parity, record)})
            report["components"][name] = {**record, "trt_lint_ok": lint.ok}
            cos = ", ".join(f"{k}={v:.4f}" for k, v in res.cosine.items())
            say(f"  {cos}; {len(res.float_nodes)} nodes kept in float; met={res.met}")
        manifest: Manifest = replace(pkg.manifest, components=comps)
        write_atomic(tmp / "reports" / "calibration.json", json.dumps(report, indent=2, sort_keys=True))
        manifest = write_manifest(tmp, manifest)
        staged = verify_package(tmp)
        report["task_metric"] = _task_metric(staged, eval_items)
        write_atomic(tmp / "reports" / "calibration.json", json.dumps(report, indent=2, sort_keys=True))
        write_manifest(tmp, manifest)
        verify_package(tmp)
    return report


def _task_metric(pkg: Package, items: list) -> dict[str, Any]:  # noqa: ANN001
    """The task metric fp32 vs int8 on the held-back samples (retrieval recall when texts exist)."""
    from mmedge.runtime.components import ComponentRunner
    from mmedge.runtime.retrieval import RetrievalPipeline
    from mmedge.sdk.evaluate import evaluate_items

    if pkg.manifest.task != "retrieval" or any(it.text is None for it in items):
        return {"skipped": "needs captions for a retrieval metric"}
    # "auto" takes int8 where it was built and fp32 where calibration skipped a component.
    return {label: evaluate_items(RetrievalPipeline(ComponentRunner(pkg, precision=p)), items)
            for label, p in (("fp32", "fp32"), ("int8", "auto"))}
