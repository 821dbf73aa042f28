"""`mmedge demo anymodal`: imagebind-tiny and meta-transformer-tiny on the synthetic scenes' audio,
depth, thermal, IMU and 3-D point clouds.

Both start from the store's trained clip-tiny (one is trained first when there is none):
imagebind-tiny copies its image and text encoders, frozen, and trains audio, depth, thermal and IMU
encoders against the image space only (`recipes.imagebind`); meta-transformer-tiny takes its vision
trunk as the frozen shared encoder and trains a tokenizer and a head per task (`recipes.meta_transformer`).
Each is exported, quantized to INT8 (imagebind: encoders calibrated on paired scenes; meta-transformer:
tokenizers and heads on their modality's examples, the shared encoder once on every modality's
tokens) and built for ONNX Runtime; then cross-modal
R@1 (each modality -> images, and -> captions, never trained), one cross-modal search through an
index holding images, captions and depth maps, and the classification accuracies, fp32 against
INT8. Training runs to step counts, so a busy machine takes longer but reaches the same figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmedge.runtime.store import model_home
from mmedge.sdk.demo import clip_from_store
from mmedge.sdk.tables import table

EVAL_SCENES, CLASSIFY_ITEMS, SEARCH_SCENES = 500, 600, 100
PRECISIONS = (("fp32", "fp32"), ("quantized", "auto"))  # auto: the INT8 graphs, fp32 where none
FURTHER = ("audio", "depth", "thermal", "imu")


def run_anymodal_demo(
    steps: int | None = None,
    threads: int = 2,
    json_out: bool = False,
    seed: int = 0,
    eval_n: int = EVAL_SCENES,
    classify_n: int = CLASSIFY_ITEMS,
) -> dict[str, Any] | None:
    """Train, export, quantize and evaluate imagebind-tiny and meta-transformer-tiny; prints progress
    and tables, or returns the results. `steps` caps training (clip-tiny's too when it is trained
    here); tests use a handful, and fewer scenes."""
    from mmedge.calibration.package import calibrate_package
    from mmedge.export.exporter import export_model
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.recipes import imagebind as ib_recipe
    from mmedge.recipes import meta_transformer as mt_recipe
    from mmedge.recipes.base import TrainRequest, train_model

    say: Callable[[str], None] = (lambda *_: None) if json_out else print
    home = model_home()
    clip_ckpt = home / "checkpoints" / "clip-tiny"
    ib_ckpt, mt_ckpt = home / "checkpoints" / "imagebind-tiny", home / "checkpoints" / "meta-transformer-tiny"
    ib_pkg, mt_pkg = home / "imagebind-tiny", home / "meta-transformer-tiny"
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    clip_from_store(clip_ckpt, steps, threads, seed, lambda m: say(f"[1/5] {m}"), timings)

    t1 = time.perf_counter()
    say(
        f"[2/5] training imagebind-tiny: audio, depth, thermal and IMU encoders against clip-tiny's frozen "
        f"image space, {steps or ib_recipe.DEFAULT_STEPS} steps (no captions)"
    )
    train_model(
        ib_ckpt,
        TrainRequest(preset="imagebind-tiny", init=str(clip_ckpt), steps=steps, threads=threads, seed=seed),
    )
    timings["imagebind_train_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    say(
        f"      training meta-transformer-tiny: tokenizers and heads around clip-tiny's frozen vision trunk, "
        f"{steps or mt_recipe.DEFAULT_STEPS} steps"
    )
    train_model(
        mt_ckpt,
        TrainRequest(
            preset="meta-transformer-tiny", init=str(clip_ckpt), steps=steps, threads=threads, seed=seed
        ),
    )
    timings["meta_transformer_train_s"] = time.perf_counter() - t1
    info = {
        "imagebind": read_checkpoint_meta(ib_ckpt)["train"],
        "meta_transformer": read_checkpoint_meta(mt_ckpt)["train"],
    }

    say(
        "[3/5] exporting both; INT8 for imagebind (calibrated on paired scenes) and meta-transformer (its shared encoder on every modality's tokens); building"
    )
    calibration = {}
    for ckpt, pkg in ((ib_ckpt, ib_pkg), (mt_ckpt, mt_pkg)):
        export_model(ckpt, pkg, progress=lambda m: say("      " + m))
        calibration[pkg.name] = calibrate_package(
            pkg,
            "train-shapes:96",
            samples=64,
            threads=threads,
            progress=lambda m: say("      " + m),
        )
    say(f"[4/5] cross-modal R@1 on {eval_n} held-out scenes, and one audio query through a mixed index")
    cross = _cross_modal(ib_pkg, threads, eval_n)
    search = _search_example(ib_pkg, threads)
    say(f"[5/5] classification of {classify_n} held-out point clouds, recordings and IMU traces")
    classes = _classification(mt_pkg, threads, classify_n)
    timings["total_s"] = time.perf_counter() - t0
    result = {
        "cross_modal": cross,
        "search": search,
        "classification": classes,
        "train": info,
        "calibration": calibration,
        "timings": timings,
        "packages": [str(ib_pkg), str(mt_pkg)],
    }
    if json_out:
        print(json.dumps(result, indent=2, default=str))
        return result
    _print(result)
    print(f"\ntotal time: {timings['total_s']:.0f} s   packages: {ib_pkg}, {mt_pkg}")
    print(
        "try: mmedge search imagebind-tiny --add shapes:200 --add-modality image,text,depth --modality audio "
        "REC.wav   or   mmedge classify meta-transformer-tiny --modality points CLOUD.npy"
    )
    return None


def _cross_modal(pkg: Path, threads: int, n: int) -> dict[str, Any]:
    from mmedge import sdk
    from mmedge.evaluation.tasks import evaluate_modalities

    return {
        label: evaluate_modalities(sdk.Pipeline(pkg, precision=precision, threads=threads), n=n)
        for label, precision in PRECISIONS
    }


def _search_example(pkg: Path, threads: int) -> dict[str, Any]:
    """Held-out scenes' images, captions and depth maps in one index; scene 0's recording queries it."""
    from mmedge import sdk
    from mmedge.data import HELD_OUT_SEED
    from mmedge.data.modalities import SAMPLE_RATE, generate_paired
    from mmedge.runtime.retrieval import RetrievalPipeline

    pipe = sdk.Pipeline(pkg, precision="int8", threads=threads)
    assert isinstance(pipe, RetrievalPipeline)
    scenes = generate_paired(SEARCH_SCENES, HELD_OUT_SEED, pipe.preprocess.image_size)
    for m in ("image", "text", "depth"):
        pipe.add([p.data(m) for p in scenes], m, labels=[f"scene {i} ({m})" for i in range(len(scenes))])
    hits = pipe.search(scenes[0].audio, k=5, modality="audio", sample_rate=SAMPLE_RATE)
    return {
        "query": f"scene 0 (audio): {scenes[0].scene.caption}",
        "indexed": len(pipe.index),
        "hits": [{"label": h.label, "score": round(h.score, 4)} for h in hits],
    }


def _classification(pkg: Path, threads: int, n: int) -> dict[str, Any]:
    from mmedge import sdk
    from mmedge.evaluation.tasks import evaluate_classification

    return {
        label: evaluate_classification(sdk.Pipeline(pkg, precision=precision, threads=threads), n=n)
        for label, precision in PRECISIONS
    }


def _print(r: dict[str, Any]) -> None:
    cross, classes = r["cross_modal"], r["classification"]
    rows = [("imagebind-tiny", "chance", "fp32", "INT8")]
    for m in FURTHER:
        for target in ("image", "text"):
            key = f"{m}_to_{target}_r1"
            note = " (emergent)" if target == "text" else ""
            rows.append(
                (
                    f"{m} -> {target} R@1{note}",
                    f"{cross['fp32'][m]['chance']:.3f}",
                    f"{cross['fp32'][m][key]:.3f}",
                    f"{cross['quantized'][m][key]:.3f}",
                )
            )
    print()
    print(table(rows))
    s = r["search"]
    print(f"\nquery {s['query']!r} over {s['indexed']} entries (images, captions, depth maps):")
    for h in s["hits"]:
        print(f"  {h['score']:.3f}  {h['label']}")
    rows = [("meta-transformer-tiny", "chance", "fp32", "INT8")]
    for m in ("points", "audio", "imu"):
        a, b = classes["fp32"][m], classes["quantized"][m]
        rows.append((f"{m} accuracy", f"{a['chance']:.3f}", f"{a['accuracy']:.3f}", f"{b['accuracy']:.3f}"))
    print()
    print(table(rows))
