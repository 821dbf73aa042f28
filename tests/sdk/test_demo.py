"""The demo's whole path runs (few training steps here; the real demo trains for minutes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def test_demo_smoke(store: Path, capsys: pytest.CaptureFixture) -> None:
    from mmedge import sdk
    from mmedge.sdk.demo import run_demo

    run_demo(steps=8, eval_n=40, threads=1, blip2_steps=4)
    out = capsys.readouterr().out
    for row in (
        "text->image R@1",
        "image->text R@5",
        "torch-eager",
        "ort-fp32",
        "ort-int8",
        "VQA accuracy",
        "caption exact-match",
        "int4 llm",
        "caption:",
    ):
        assert row in out
    assert {"clip-tiny", "blip2-tiny"} <= set(sdk.list_packages())
    p = sdk.Pipeline("clip-tiny")
    assert p.runner.precision_of("vision") == "int8"
    assert p.embed_texts(["a red circle"]).shape == (1, p.dim)
    chat = sdk.Pipeline("blip2-tiny")
    assert {c: chat.runner.precision_of(c) for c in ("vision", "qformer", "llm")} == {
        "vision": "int8",
        "qformer": "int8",
        "llm": "int4",
    }
    img = np.zeros((64, 64, 3), np.uint8)
    assert isinstance(chat.chat(img, "what colour is the circle?", max_new_tokens=3), str)


def test_llava_demo_smoke(store: Path, capsys: pytest.CaptureFixture) -> None:
    """`mmedge demo llava` from an empty store trains clip-tiny first; a second run reuses it."""
    import json

    from mmedge import sdk
    from mmedge.sdk.cli import main

    assert main(["demo", "llava", "--steps", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "no trained clip-tiny in the model store" in out
    for row in (
        "VQA accuracy",
        "  position",
        "  colour",
        "caption exact-match",
        "int4 llm",
        "int8 vision/projector",
    ):
        assert row in out
    header = next(line for line in out.splitlines() if line.startswith("question (quantized model)"))
    assert header.split()[-2:] == ["answer", "truth"]
    clip = store / "checkpoints" / "clip-tiny" / "model.safetensors"
    trained = clip.stat().st_mtime_ns

    assert main(["demo", "llava", "--steps", "3", "--threads", "1", "--json", "--seed", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert clip.stat().st_mtime_ns == trained  # reused, not retrained
    assert "clip_train_s" not in r["timings"]
    for precision in ("fp32", "quantized"):
        ev = r["eval"][precision]
        assert set(ev["vqa_by_kind"]) == {"colour", "shape", "count", "position"} and ev["questions"] == 300
        assert len(ev["examples"]) == 6 and {"question", "answer", "expected"} <= set(ev["examples"][0])
    assert {r["train"][s]["steps"] for s in ("lm", "stage1", "stage2")} == {3}
    assert r["eval"]["quantized"]["precisions"] == {
        "vision": "int8",
        "projector": "int8",
        "embed": "fp32",
        "llm": "int4",
    }
    chat = sdk.Pipeline("llava-tiny")
    assert isinstance(
        chat.chat(np.zeros((64, 64, 3), np.uint8), "where is the red circle?", max_new_tokens=3), str
    )


def test_demo_refuses_clip_only_with_llava(store: Path, capsys: pytest.CaptureFixture) -> None:
    from mmedge.sdk.cli import main

    assert main(["demo", "llava", "--clip-only"]) == 1
    assert "--clip-only" in capsys.readouterr().err
    assert not (store / "checkpoints").exists()


def test_fusion_demo_smoke(store: Path, capsys: pytest.CaptureFixture) -> None:
    """`mmedge demo fusion`: blip-tiny's two packages, re-ranking and captions, fp32 and quantized."""
    from mmedge import sdk
    from mmedge.sdk.demo_fusion import EDITS, run_fusion_demo

    r = run_fusion_demo(steps=3, threads=1, json_out=True, eval_n=12, captions=3, questions=8)
    assert r is not None
    assert r["train"]["steps"] == 3 and r["train"]["init"] == str(store / "checkpoints" / "clip-tiny")
    for precision in ("fp32", "quantized"):
        hard = r["retrieval"][precision]["hard"]
        assert set(hard) == set(EDITS)
        assert [hard[e]["gallery"] for e in EDITS] == [12 * (1 + e) for e in EDITS]
        assert r["captions"][precision]["captions"] == 3
        assert r["vqa"][precision]["questions"] == 8
    assert r["retrieval"]["quantized"]["precisions"]["vision"] == "int8"
    assert r["captions"]["quantized"]["precisions"]["llm"] == "int8"
    assert {"blip-tiny", "blip-tiny-caption", "blip-tiny-vqa"} <= set(sdk.list_packages())
    p = sdk.Pipeline("blip-tiny")
    images = [np.full((64, 64, 3), c, np.uint8) for c in (0, 90, 180, 255)]
    p.add_images(images, ids=[0, 1, 2, 3])
    hits = p.search("a red circle", k=2, rerank=4, source=lambda h: images[h.id])
    assert len(hits) == 2 and all(h.itm is not None for h in hits)
    caption = sdk.Pipeline("blip-tiny-caption").caption(np.zeros((64, 64, 3), np.uint8), max_new_tokens=3)
    assert isinstance(caption, str)
    vqa = sdk.Pipeline("blip-tiny-vqa")
    assert isinstance(
        vqa.chat(np.zeros((64, 64, 3), np.uint8), "what colour is the star?", max_new_tokens=3), str
    )


def test_anymodal_demo_smoke(store: Path) -> None:
    """`mmedge demo anymodal`: imagebind-tiny and meta-transformer-tiny trained on the store's
    clip-tiny, exported, INT8, cross-modal R@1, one mixed-index search, classification accuracy."""
    from mmedge import sdk
    from mmedge.sdk.demo_anymodal import FURTHER, run_anymodal_demo

    r = run_anymodal_demo(steps=3, threads=1, json_out=True, eval_n=12, classify_n=8)
    assert r is not None
    for precision in ("fp32", "quantized"):
        cross = r["cross_modal"][precision]
        assert cross["scenes"] == 12 and all(0 <= cross[m][f"{m}_to_text_r1"] <= 1 for m in FURTHER)
        assert {"points", "audio", "imu"} <= set(r["classification"][precision])
    assert r["cross_modal"]["quantized"]["precisions"]["audio"] == "int8"
    assert r["classification"]["quantized"]["precisions"]["encoder"] == "int8"
    assert r["search"]["indexed"] == 300 and len(r["search"]["hits"]) == 5
    assert r["train"]["imagebind"]["steps"] == 3
    before = r["train"]["meta_transformer"]["encoder_sha256"]
    assert before["before"] == before["after"]
    assert {"imagebind-tiny", "meta-transformer-tiny"} <= set(sdk.list_packages())
