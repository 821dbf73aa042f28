"""`mmedge demo generate`: sd-tiny — a pixel-space text-to-image model trained, exported, quantized
and judged on held-out captions.

sd-tiny (`recipes.sd`) trains its U-Net and text encoder together on fresh one-object scenes; it is
exported (text encoder and U-Net), calibrated (INT8 text encoder; INT8 U-Net on its own denoising
trajectories of synthetic captions, with the image PSNR against fp32 recorded) and built for ONNX
Runtime. Then both precisions draw held-out captions ("a large red circle at the top left") and
`evaluation.drawn_scenes` reads back the drawn object's colour, shape, size and position. Training
runs to a step count, so a busy machine takes longer but reaches the same figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from mmedge.runtime.image_generation import ImageGenerationPipeline
from mmedge.runtime.store import model_home
from mmedge.sdk.tables import table

EVAL_IMAGES = 200
PRECISIONS = (("fp32", "fp32"), ("quantized", "auto"))
SAMPLE_PROMPT = "a large red circle at the top left"


def run_generate_demo(
    steps: int | None = None,
    threads: int = 2,
    json_out: bool = False,
    seed: int = 0,
    eval_n: int = EVAL_IMAGES,
) -> dict[str, Any] | None:
    """Train, export, quantize and judge sd-tiny; prints progress and a table, or returns the results.
    `steps` caps training (tests use a handful) and `eval_n` the held-out captions drawn."""
    from mmedge import sdk
    from mmedge.calibration.package import calibrate_package
    from mmedge.evaluation.drawn_scenes import evaluate_generation
    from mmedge.export.exporter import export_model
    from mmedge.recipes.base import TrainRequest, train_model

    say: Callable[[str], None] = (lambda *_: None) if json_out else print
    home = model_home()
    ckpt, pkg = home / "checkpoints" / "sd-tiny", home / "sd-tiny"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    say("[1/4] train sd-tiny (U-Net + text encoder, one-object scenes)")
    train_model(ckpt, TrainRequest("sd-tiny", steps=steps, seed=seed, threads=threads), progress=not json_out)
    timings["train_s"] = round(time.perf_counter() - t0, 1)

    t1 = time.perf_counter()
    say("[2/4] export, calibrate (U-Net on denoising trajectories) and build for ONNX Runtime")
    export_model(ckpt, pkg, progress=lambda m: say("      " + m))
    calib = calibrate_package(
        pkg, "train-shapes:64", samples=32, threads=threads, progress=lambda m: say("      " + m)
    )
    timings["export_quantize_s"] = round(time.perf_counter() - t1, 1)

    t2 = time.perf_counter()
    say(f"[3/4] draw {eval_n} held-out captions at each precision and judge the drawn object")
    scores = {
        label: evaluate_generation(sdk.Pipeline(pkg, precision=p, threads=threads), n=eval_n)
        for label, p in PRECISIONS
    }
    timings["evaluate_s"] = round(time.perf_counter() - t2, 1)

    sample = home / "sd-tiny-sample.png"
    pipe = sdk.Pipeline(pkg, threads=threads)
    assert isinstance(pipe, ImageGenerationPipeline)  # sd-tiny's task
    drawn = pipe.generate(SAMPLE_PROMPT, seed=seed)
    drawn.save(sample)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    results = {
        "package": str(pkg),
        "judged": scores,
        "image_vs_fp32": calib.get("task_metric", {}).get("quantized_vs_fp32"),
        "sample": {"prompt": SAMPLE_PROMPT, "seed": drawn.seed, "file": str(sample)},
        "timings": timings,
    }
    if json_out:
        print(json.dumps(results, indent=2, sort_keys=True))
        return results
    keys = ("colour_and_shape", "colour", "shape", "size", "position")
    rows = [("attribute (chance)", *(label for label, _ in PRECISIONS))]
    chance = {"colour_and_shape": "1/24", "colour": "1/6", "shape": "1/4", "size": "1/2", "position": "1/5"}
    rows += [(f"{k} ({chance[k]})", *(f"{scores[label][k]:.3f}" for label, _ in PRECISIONS)) for k in keys]
    say("[4/4] results")
    say(table(rows))
    say(f"image PSNR of the quantized package against fp32: {results['image_vs_fp32']}")
    say(f"sample: {sample} ({SAMPLE_PROMPT!r}); timings: {timings}")
    return results
