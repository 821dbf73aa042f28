"""`mmedge demo fusion`: blip-tiny — ITC retrieval re-ranked by the fusion encoder, captions from
the image-grounded decoder, and VQA.

blip-tiny trains on the store's trained clip-tiny ViT (one is trained first when there is none)
with BLIP's three losses, then VQA fine-tuning (`recipes.blip`), which writes three checkpoints:
`blip-tiny` (ITC + ITM), `blip-tiny-caption` and `blip-tiny-vqa`. Each is exported, quantized (INT8
vision and text encoders; weight-only INT8 ITM, question encoder, cross keys/values and decoder
steps) and built for ONNX Runtime; then retrieval on held-out scenes, text->image R@1 among
one-attribute edits with and without ITM re-ranking, caption exact-match and VQA, fp32 against
quantized. Training runs to step counts, so a busy machine takes longer but reaches the same figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmedge.runtime.store import model_home
from mmedge.sdk.demo import clip_from_store, export_quantize, print_answers, vqa_rows
from mmedge.sdk.tables import table

RERANK_DEPTH = 16
# Edits per held-out scene in the hard-negative gallery: one, and several (more near-duplicates in
# each query's top 16, where re-ranking has to tell them apart).
EDITS = (1, 7)
EVAL_SCENES, CAPTIONS, VQA_QUESTIONS, VQA_SCENES = 500, 100, 300, 100
VQA_KINDS = ("colour", "shape", "count", "position")
PRECISIONS = (("fp32", "fp32"), ("quantized", "auto"))


def run_fusion_demo(
    steps: int | None = None,
    threads: int = 2,
    json_out: bool = False,
    seed: int = 0,
    eval_n: int = EVAL_SCENES,
    captions: int = CAPTIONS,
    questions: int = VQA_QUESTIONS,
) -> dict[str, Any] | None:
    """Train, export, quantize and evaluate blip-tiny; prints progress and tables, or returns the
    results. `steps` caps training (clip-tiny's too when it is trained here); tests use a handful,
    and fewer scenes (`eval_n`) and captions."""
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.recipes.base import TrainRequest, train_model
    from mmedge.recipes.blip import DEFAULT_STEPS, VQA_STEPS, task_checkpoint_path

    say: Callable[[str], None] = (lambda *_: None) if json_out else print
    home = model_home()
    clip_ckpt, ckpt = home / "checkpoints" / "clip-tiny", home / "checkpoints" / "blip-tiny"
    ckpts = {"itm": ckpt, **{v: task_checkpoint_path(ckpt, v) for v in ("caption", "vqa")}}
    pkgs = {v: home / c.name for v, c in ckpts.items()}
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    clip_from_store(clip_ckpt, steps, threads, seed, lambda m: say(f"[1/5] {m}"), timings)

    t1 = time.perf_counter()
    say(
        f"[2/5] training blip-tiny on clip-tiny's ViT: {steps or DEFAULT_STEPS} steps of ITC (momentum distillation), "
        f"ITM and LM, then {steps or VQA_STEPS} of VQA"
    )
    request = TrainRequest(preset="blip-tiny", init=str(clip_ckpt), steps=steps, threads=threads, seed=seed)
    train_model(ckpt, request)
    timings["blip_train_s"] = time.perf_counter() - t1
    info = read_checkpoint_meta(ckpt).get("train", {})
    say(
        f"      {info.get('steps')} + {info['vqa']['steps']} steps in {timings['blip_train_s']:.0f} s, final "
        f"losses {info.get('final_loss', 0):.3f} and {info['vqa']['final_loss']:.3f}"
    )
    say(
        "[3/5] exporting the itm, caption and vqa checkpoints; quantizing (INT8 encoders, weight-only INT8 "
        "ITM, question encoder and decoders); building"
    )
    calibration = {v: export_quantize(ckpts[v], pkgs[v], threads, say, weight_bits=8) for v in ckpts}
    say(
        f"[4/5] retrieval on {eval_n} held-out scenes; R@1 among one-attribute edits, re-ranking the top "
        f"{RERANK_DEPTH}"
    )
    retrieval = _evaluate_retrieval(pkgs["itm"], threads, eval_n)
    say(f"[5/5] {captions} captions and {questions} questions ({', '.join(VQA_KINDS)}) of held-out scenes")
    caption_eval = _evaluate_chat(pkgs["caption"], threads, 0, captions)
    vqa_eval = _evaluate_chat(pkgs["vqa"], threads, questions, 0)
    timings["total_s"] = time.perf_counter() - t0
    result = {
        "retrieval": retrieval,
        "captions": caption_eval,
        "vqa": vqa_eval,
        "train": info,
        "calibration": calibration,
        "timings": timings,
        "packages": [str(p) for p in pkgs.values()],
    }
    if json_out:
        print(json.dumps(result, indent=2, default=str))
        return result
    _print(result)
    print(f"\ntotal time: {timings['total_s']:.0f} s   packages: {', '.join(str(p) for p in pkgs.values())}")
    print(
        'try: mmedge search blip-tiny "a small red circle in the center" --add shapes:200 --rerank 16   or   '
        'mmedge caption blip-tiny-caption IMAGE   or   mmedge chat blip-tiny-vqa IMAGE "what colour is the star?"'
    )
    return None


def _evaluate_retrieval(pkg: Path, threads: int, n: int) -> dict[str, Any]:
    from mmedge import sdk
    from mmedge.evaluation.tasks import evaluate, evaluate_rerank

    out: dict[str, Any] = {}
    for label, precision in PRECISIONS:
        pipe = sdk.Pipeline(pkg, precision=precision, threads=threads)
        out[label] = {
            **evaluate(pipe, f"shapes:{n}"),
            "hard": {e: evaluate_rerank(pipe, n=n, depth=RERANK_DEPTH, edits=e) for e in EDITS},
        }
    return out


def _evaluate_chat(pkg: Path, threads: int, questions: int, captions: int) -> dict[str, Any]:
    from mmedge import sdk
    from mmedge.evaluation.tasks import evaluate_chat

    return {
        label: evaluate_chat(
            sdk.Pipeline(pkg, precision=precision, threads=threads),
            f"shapes:{max(captions, VQA_SCENES)}",
            questions=questions,
            captions=captions,
            kinds=VQA_KINDS,
        )
        for label, precision in PRECISIONS
    }


def _print(r: dict[str, Any]) -> None:
    ret, cap = r["retrieval"], r["captions"]
    q = ret["quantized"]["precisions"]
    print()
    rows = [("blip-tiny", "fp32", f"quantized ({q['vision']} vision, {q['itm']} itm)")]
    for key, name in (("t2i_r1", "text->image R@1"), ("i2t_r1", "image->text R@1")):
        rows.append((name, f"{ret['fp32'][key]:.3f}", f"{ret['quantized'][key]:.3f}"))
    for e in EDITS:
        a, b = ret["fp32"]["hard"][e], ret["quantized"]["hard"][e]
        rows.append(
            (
                f"hard ({e} edit{'s' if e > 1 else ''}/scene), contrastive R@1",
                f"{a['t2i_r1_contrastive']:.3f}",
                f"{b['t2i_r1_contrastive']:.3f}",
            )
        )
        rows.append(
            (
                f"hard ({e} edit{'s' if e > 1 else ''}/scene), ITM re-ranked R@1",
                f"{a['t2i_r1_rerank']:.3f}",
                f"{b['t2i_r1_rerank']:.3f}",
            )
        )
    qc = cap["quantized"]["precisions"]
    rows.append(
        (
            "caption exact-match",
            f"{cap['fp32']['caption_exact_match']:.3f}",
            f"{cap['quantized']['caption_exact_match']:.3f} ({qc['llm']} decoder)",
        )
    )
    rows += vqa_rows(r["vqa"], VQA_KINDS)
    print(table(rows))
    print_answers(r["vqa"]["quantized"]["examples"])
    for c in cap["quantized"]["caption_examples"][:3]:
        print(f"\ncaption: {c['caption']}\ntruth:   {c['truth']}")
