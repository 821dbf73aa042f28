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
