"""`mmedge demo`: the whole path on clip-tiny — train, export, calibrate, evaluate, benchmark.

Artifacts go to the model store, so `sdk.Pipeline("clip-tiny")` works afterwards.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mmedge.sdk.store import model_home

DEMO_STEPS = 1600
# The schedule anneals by this deadline even on a slow machine, keeping the demo near 5 minutes.
DEMO_TRAIN_BUDGET_S = 275.0


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(steps: int | None = None, eval_n: int = 500, threads: int = 2, json_out: bool = False) -> dict[str, Any] | None:
    """Run the demo; prints progress and the result table (or returns the results as a dict)."""
    from mmedge import sdk
    from mmedge.calibration.build import build_package
    from mmedge.calibration.package import calibrate_package
    from mmedge.export.exporter import export_model
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.models.clip_train import CLIPTrainSettings, train_clip
    from mmedge.sdk.bench import bench
    from mmedge.sdk.evaluate import evaluate

    say = (lambda *_: None) if json_out else print
    home = model_home()
    ckpt, pkg = home / "checkpoints" / "clip-tiny", home / "clip-tiny"
    t0 = time.perf_counter()
    timings = {}

    say(f"[1/5] training clip-tiny on synthetic scenes (model store: {home})")
    train_clip(ckpt, CLIPTrainSettings(steps=steps or DEMO_STEPS, threads=threads, time_budget_s=DEMO_TRAIN_BUDGET_S))
    timings["train_s"] = time.perf_counter() - t0
    trained = read_checkpoint_meta(ckpt).get("train", {})
    say(f"      {trained.get('steps')} steps in {timings['train_s']:.0f} s, final loss {trained.get('final_loss', 0):.3f}")

    say("[2/5] exporting vision and text towers to ONNX")
    export_model(ckpt, pkg, progress=lambda m: say("      " + m))
    say("[3/5] calibrating to INT8 (Q/DQ) on 64 training scenes, building for ONNX Runtime")
    calib = calibrate_package(pkg, "train-shapes:96", samples=64, progress=lambda m: say("      " + m))
    build_package(pkg, backend="ort", threads=threads, progress=lambda m: say("      " + m))

    say(f"[4/5] evaluating retrieval on {eval_n} held-out scenes")
    data = f"shapes:{eval_n}"
    ev = {p: evaluate(sdk.Pipeline(pkg, precision=p, threads=threads), data) for p in ("fp32", "int8")}

    say("[5/5] benchmarking the vision tower, batch 1")
    b = bench(str(pkg), precision="int8", batches=[1], threads=threads, runs=30, vs="torch", components=["vision"])
    lat = b["components"]["vision"]["batch1"]
    timings["total_s"] = time.perf_counter() - t0

    result = {"eval": ev, "bench_vision_batch1": lat, "calibration": calib, "timings": timings, "package": str(pkg)}
    if json_out:
        print(json.dumps(result, indent=2, default=str))
        return result
    rows = [("metric", "fp32", "int8")]
    for key, name in (("t2i_r1", "text->image R@1"), ("t2i_r5", "text->image R@5"),
                      ("i2t_r1", "image->text R@1"), ("i2t_r5", "image->text R@5")):
        rows.append((name, f"{ev['fp32'][key]:.3f}", f"{ev['int8'][key]:.3f}"))
    print()
    print(_table(rows))
    print()
    rows = [("vision tower, batch 1", "p50 ms", "vs torch eager")]
    torch_ms = lat["torch-eager"]["p50_ms"]
    for k in ("torch-eager", "ort-fp32", "ort-int8"):
        rows.append((k, f"{lat[k]['p50_ms']:.2f}", f"{torch_ms / lat[k]['p50_ms']:.1f}x"))
    print(_table(rows))
    print(f"\npackage: {pkg}   total time: {timings['total_s']:.0f} s   "
          f"try: python -c \"from mmedge import sdk; p = sdk.Pipeline('clip-tiny'); print(p.embed_texts(['a red circle']).shape)\"")
    return None
