"""The demo's whole path runs (few training steps here; the real demo trains for minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_demo_smoke(store: Path, capsys: pytest.CaptureFixture) -> None:
    from mmedge import sdk
    from mmedge.sdk.demo import run_demo

    run_demo(steps=8, eval_n=40, threads=1)
    out = capsys.readouterr().out
    for row in ("text->image R@1", "image->text R@5", "torch-eager", "ort-fp32", "ort-int8"):
        assert row in out
    assert "clip-tiny" in sdk.list_packages()
    p = sdk.Pipeline("clip-tiny")
    assert p.runner.precision_of("vision") == "int8"
    assert p.embed_texts(["a red circle"]).shape == (1, p.dim)
