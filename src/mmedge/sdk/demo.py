"""`mmedge demo`: the whole path — clip-tiny retrieval, then blip2-tiny caption and VQA;
`mmedge demo llava`: llava-tiny chat on clip-tiny's tower.

clip-tiny: train, export, calibrate to INT8, build for ORT, evaluate retrieval, benchmark.
blip2-tiny: train (LM, stage 1, stage 2) on clip-tiny's frozen vision tower, export, quantize
(INT8 encoders + INT4 LLM), build, then VQA accuracy and captions fp32 vs quantized.
llava-tiny: the same path for LLaVA-1.5 (LM, projector alignment, instruction tuning), with
position questions besides colour, shape and count; it reuses a trained clip-tiny from the store.
Artifacts go to the model store, so `sdk.Pipeline("clip-tiny")` / `sdk.Pipeline("blip2-tiny")` /
`sdk.Pipeline("llava-tiny")` work afterwards. Training runs to fixed step counts, so a busy machine
takes longer but reaches the same figures; on 2 idle cores without AMX (fp32 training) the demo
takes 10-13 minutes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmedge.runtime.store import model_home
from mmedge.sdk.tables import table

# clip-tiny's R@1 follows its step count (runs with a time budget: 0.69 at 1199 steps, 0.896 at
# 1461, 0.91-0.98 at 1568-1967), so the demo trains to step counts, not to a clock.
CLIP_STEPS = 2000
BLIP2_STEPS = {"lm_steps": 1800, "stage1_steps": 450, "stage2_steps": 1800}
LLAVA_STEPS = {"lm_steps": 600, "stage1_steps": 150, "stage2_steps": 3800}
VQA_QUESTIONS, VQA_SCENES, CAPTIONS = 300, 100, 50
LLAVA_KINDS = ("colour", "shape", "count", "position")


def run_demo(
    steps: int | None = None,
    eval_n: int = 500,
    threads: int = 2,
    json_out: bool = False,
    blip2: bool = True,
    blip2_steps: int | None = None,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Run the demo; prints progress and the result tables (or returns the results as a dict).

    `steps` / `blip2_steps` cap training steps (tests use a handful); `seed` seeds every training.
    """
    from mmedge import sdk
    from mmedge.calibration.package import calibrate_package
    from mmedge.evaluation.tasks import evaluate, evaluate_zero_shot
    from mmedge.export.exporter import export_model
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.recipes.base import TrainRequest
    from mmedge.recipes.clip import train as train_clip
    from mmedge.runtime.package import read_manifest
    from mmedge.sdk.bench import bench

    say = (lambda *_: None) if json_out else print
    home = model_home()
    ckpt, pkg = home / "checkpoints" / "clip-tiny", home / "clip-tiny"
    t0 = time.perf_counter()
    timings = {}
    n = 7 if blip2 else 4

    say(f"[1/{n}] training clip-tiny on synthetic scenes, {steps or CLIP_STEPS} steps (model store: {home})")
    train_clip(ckpt, TrainRequest(preset="clip-tiny", steps=steps or CLIP_STEPS, threads=threads, seed=seed))
    timings["clip_train_s"] = time.perf_counter() - t0
    trained = read_checkpoint_meta(ckpt).get("train", {})
    say(
        f"      {trained.get('steps')} steps in {timings['clip_train_s']:.0f} s, final loss {trained.get('final_loss', 0):.3f}"
    )

    say(
        f"[2/{n}] exporting the vision and text towers to ONNX, calibrating to INT8 (Q/DQ) on 64 training "
        "scenes, building for ONNX Runtime"
    )
    export_model(ckpt, pkg, progress=lambda m: say("      " + m))
    calib = calibrate_package(
        pkg, "train-shapes:96", samples=64, threads=threads, progress=lambda m: say("      " + m)
    )

    say(f"[3/{n}] evaluating retrieval on {eval_n} held-out scenes, short queries and zero-shot shapes")
    data = f"shapes:{eval_n}"
    ev = {}
    for p in ("fp32", "int8"):
        pipe = sdk.Pipeline(pkg, precision=p, threads=threads)
        ev[p] = {**evaluate(pipe, data), **evaluate_zero_shot(pipe)}

    say(f"[4/{n}] benchmarking the vision tower, batch 1")
    vision = read_manifest(pkg).by_role("image_encoder")
    b = bench(
        str(pkg), precision="int8", batches=[1], threads=threads, runs=30, vs="torch", components=[vision]
    )
    lat = b["components"][vision]["batch1"]
    timings["clip_s"] = time.perf_counter() - t0
    result: dict[str, Any] = {
        "eval": ev,
        "bench_vision_batch1": lat,
        "calibration": calib,
        "timings": timings,
        "package": str(pkg),
    }
    if blip2:
        result["blip2"] = _blip2_part(ckpt, home, threads, blip2_steps, seed, say, n, timings)
    timings["total_s"] = time.perf_counter() - t0
    if json_out:
        print(json.dumps(result, indent=2, default=str))
        return result
    rows = [("clip-tiny retrieval", "fp32", "int8")]
    for key, name in (
        ("t2i_r1", "text->image R@1"),
        ("t2i_r5", "text->image R@5"),
        ("i2t_r1", "image->text R@1"),
        ("i2t_r5", "image->text R@5"),
        ("short_query_r1", "short queries R@1 ('a red square')"),
        ("shape_accuracy", "zero-shot shape (200 one-object scenes)"),
    ):
        rows.append((name, f"{ev['fp32'][key]:.3f}", f"{ev['int8'][key]:.3f}"))
    print()
    print(table(rows))
    print()
    rows = [("vision tower, batch 1", "p50 ms", "vs torch eager")]
    torch_ms = lat["torch-eager"]["p50_ms"]
    for k in ("torch-eager", "ort-fp32", "ort-int8"):
        rows.append((k, f"{lat[k]['p50_ms']:.2f}", f"{torch_ms / lat[k]['p50_ms']:.1f}x"))
    print(table(rows))
    if blip2:
        _print_chat("blip2-tiny", "vision/qformer", result["blip2"], ("colour", "shape", "count"))
    print(
        f"\ntotal time: {timings['total_s']:.0f} s (clip-tiny part {timings['clip_s']:.0f} s)   packages: {pkg}"
        + (", blip2-tiny" if blip2 else "")
    )
    print(
        'try: mmedge chat blip2-tiny IMAGE "what colour is the circle?"   or   '
        "python -c \"from mmedge import sdk; p = sdk.Pipeline('clip-tiny'); print(p.embed_texts(['a red circle']).shape)\""
    )
    return None


def _blip2_part(
    clip_ckpt: Path,
    home: Path,
    threads: int,
    steps: int | None,
    seed: int,
    say: Callable[[str], None],
    n: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.recipes.blip2 import Blip2TrainSettings, train_blip2

    ckpt, pkg = home / "checkpoints" / "blip2-tiny", home / "blip2-tiny"
    t0 = time.perf_counter()
    say(
        f"[5/{n}] training blip2-tiny on clip-tiny's frozen vision tower: LM, stage 1 (ITC+ITM+ITG), stage 2 (LM loss + slot loss)"
    )
    stage = {k: steps or v for k, v in BLIP2_STEPS.items()}
    settings = Blip2TrainSettings(
        clip_checkpoint=str(clip_ckpt),
        threads=threads,
        lm_steps=stage["lm_steps"],
        stage1_steps=stage["stage1_steps"],
        stage2_steps=stage["stage2_steps"],
        pool=256 if steps else Blip2TrainSettings.pool,
        seed=seed,
    )
    train_blip2(ckpt, settings)
    timings["blip2_train_s"] = time.perf_counter() - t0
    info = read_checkpoint_meta(ckpt).get("train", {})
    _say_stages(say, info)
    say(
        f"[6/{n}] exporting vision, qformer, projector, embed, llm; quantizing (INT8 encoders, INT4 LLM); building"
    )
    calib = export_quantize(ckpt, pkg, threads, say)
    say(
        f"[7/{n}] VQA on {VQA_QUESTIONS} held-out questions (colour, shape, count) and {CAPTIONS} captions, "
        "fp32 vs quantized"
    )
    ev = _evaluate_chat(pkg, threads, ("colour", "shape", "count"))
    return {"eval": ev, "train": info, "calibration": calib, "package": str(pkg)}


def run_llava_demo(
    steps: int | None = None, threads: int = 2, json_out: bool = False, seed: int = 0
) -> dict[str, Any] | None:
    """`mmedge demo llava`: llava-tiny on clip-tiny's frozen tower (the store's trained clip-tiny, else
    one trained first) — train, export, quantize, build, then VQA (colour, shape, count, position)
    and captions, fp32 against quantized. Prints progress and tables, or returns the results.

    `steps` caps every training stage (tests use a handful), clip-tiny's too when it is trained here.
    """
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.recipes.llava import LlavaTrainSettings, train_llava

    say = (lambda *_: None) if json_out else print
    home = model_home()
    clip_ckpt, ckpt, pkg = (
        home / "checkpoints" / "clip-tiny",
        home / "checkpoints" / "llava-tiny",
        home / "llava-tiny",
    )
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    clip_from_store(clip_ckpt, steps, threads, seed, lambda m: say(f"[1/4] {m}"), timings)
    t1 = time.perf_counter()
    say(
        "[2/4] training llava-tiny on clip-tiny's frozen vision tower: LM, stage 1 (projector on captions), "
        "stage 2 (projector + LM on conversations)"
    )
    stage = {k: steps or v for k, v in LLAVA_STEPS.items()}
    settings = LlavaTrainSettings(
        clip_checkpoint=str(clip_ckpt),
        threads=threads,
        seed=seed,
        lm_steps=stage["lm_steps"],
        stage1_steps=stage["stage1_steps"],
        stage2_steps=stage["stage2_steps"],
        pool=256 if steps else LlavaTrainSettings.pool,
    )
    train_llava(ckpt, settings)
    timings["llava_train_s"] = time.perf_counter() - t1
    info = read_checkpoint_meta(ckpt).get("train", {})
    _say_stages(say, info)
    say(
        "[3/4] exporting vision, projector, embed, llm; quantizing (INT8 vision + projector, INT4 LLM); building"
    )
    calib = export_quantize(ckpt, pkg, threads, say)
    say(
        f"[4/4] VQA on {VQA_QUESTIONS} held-out questions ({', '.join(LLAVA_KINDS)}) and {CAPTIONS} captions, "
        "fp32 vs quantized"
    )
    ev = _evaluate_chat(pkg, threads, LLAVA_KINDS)
    timings["llava_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    result = {"eval": ev, "train": info, "calibration": calib, "timings": timings, "package": str(pkg)}
    if json_out:
        print(json.dumps(result, indent=2, default=str))
        return result
    _print_chat("llava-tiny", "vision/projector", result, LLAVA_KINDS)
    print(
        f"\ntotal time: {timings['total_s']:.0f} s (llava-tiny part {timings['llava_s']:.0f} s)   package: {pkg}"
    )
    print('try: mmedge chat llava-tiny IMAGE "where is the red circle?"')
    return None


def clip_from_store(
    clip_ckpt: Path,
    steps: int | None,
    threads: int,
    seed: int,
    say: Callable[[str], None],
    timings: dict[str, float],
) -> None:
    """The store's trained clip-tiny at `clip_ckpt`, or one trained there first (`steps` caps it)."""
    from mmedge.models.checkpoint import is_checkpoint, read_checkpoint_meta

    if is_checkpoint(clip_ckpt) and read_checkpoint_meta(clip_ckpt).get("family") == "clip":
        clip_info = read_checkpoint_meta(clip_ckpt).get("train", {})
        say(f"reusing clip-tiny from the model store ({clip_info.get('steps')} steps): {clip_ckpt}")
        return
    from mmedge.recipes.base import TrainRequest
    from mmedge.recipes.clip import train as train_clip

    t0 = time.perf_counter()
    say(
        f"no trained clip-tiny in the model store ({clip_ckpt.parent.parent}): training it, {steps or CLIP_STEPS} steps"
    )
    train_clip(
        clip_ckpt, TrainRequest(preset="clip-tiny", steps=steps or CLIP_STEPS, threads=threads, seed=seed)
    )
    timings["clip_train_s"] = time.perf_counter() - t0


def export_quantize(
    ckpt: Path, pkg: Path, threads: int, say: Callable[[str], None], weight_bits: int = 4
) -> dict[str, Any]:
    """Export a checkpoint, quantize it (INT8 encoders, weight-only `weight_bits` for what has no
    single calibration path: the LLM, ITM, cross keys/values) and build it."""
    from mmedge.calibration.package import calibrate_package
    from mmedge.export.exporter import export_model

    export_model(ckpt, pkg, progress=lambda m: say("      " + m))
    calib: dict[str, Any] = calibrate_package(
        pkg,
        "train-shapes:96",
        samples=64,
        weight_bits=(weight_bits,),
        threads=threads,
        progress=lambda m: say("      " + m),
    )
    return calib


def _evaluate_chat(pkg: Path, threads: int, kinds: tuple[str, ...]) -> dict[str, Any]:
    """VQA on held-out scenes and captions, greedy, fp32 and the quantized build."""
    from mmedge import sdk
    from mmedge.evaluation.tasks import evaluate_chat

    return {
        label: evaluate_chat(
            sdk.Pipeline(pkg, precision=p, threads=threads),
            f"shapes:{VQA_SCENES}",
            questions=VQA_QUESTIONS,
            captions=CAPTIONS,
            kinds=kinds,
        )
        for label, p in (("fp32", "fp32"), ("quantized", "auto"))
    }


def _print_chat(model: str, encoders: str, r: dict[str, Any], kinds: tuple[str, ...]) -> None:
    """VQA by kind and captions, fp32 against quantized, then answers beside the truth."""
    ev = r["eval"]
    q = ev["quantized"]["precisions"]
    print()
    rows = [(model, "fp32", f"quantized ({q['vision']} {encoders}, {q['llm']} llm)")]
    rows += vqa_rows(ev, kinds)
    rows.append(
        (
            "caption exact-match",
            f"{ev['fp32']['caption_exact_match']:.3f}",
            f"{ev['quantized']['caption_exact_match']:.3f}",
        )
    )
    print(table(rows))
    print_answers(ev["quantized"]["examples"])
    for c in ev["quantized"]["caption_examples"][:2]:
        print(f"\ncaption: {c['caption']}\ntruth:   {c['truth']}")


def vqa_rows(ev: dict[str, Any], kinds: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Table rows of VQA accuracy, overall then by kind, fp32 against quantized (`ev`'s two results)."""
    a, b = ev["fp32"], ev["quantized"]
    rows = [("VQA accuracy", f"{a['vqa_accuracy']:.3f}", f"{b['vqa_accuracy']:.3f}")]
    for kind in kinds:
        x, y = a["vqa_by_kind"].get(kind), b["vqa_by_kind"].get(kind)
        if x is not None:
            rows.append((f"  {kind}", f"{x:.3f}", f"{y:.3f}"))
    return rows


def print_answers(examples: list[dict[str, Any]]) -> None:
    """The quantized model's answers beside the truth."""
    print()
    print(
        table(
            [("question (quantized model)", "answer", "truth")]
            + [(e["question"], e["answer"], e["expected"]) for e in examples]
        )
    )


def _say_stages(say: Any, info: dict[str, Any]) -> None:
    """One line per training stage of a staged chat recipe (LM, stage 1, stage 2)."""
    for part in ("lm", "stage1", "stage2"):
        loss = info[part]["final_loss"]
        say(
            f"      {part}: {info[part]['steps']} steps in {info[part]['seconds']:.0f} s, "
            + (f"final loss {loss:.3f}" if loss is not None else "skipped")
        )
