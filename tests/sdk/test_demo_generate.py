"""`mmedge demo generate` runs its whole path with a handful of training steps."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("diffusers")


def test_the_generate_demo_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmedge.sdk.demo_generate import run_generate_demo

    monkeypatch.setenv("MMEDGE_HOME", str(tmp_path))
    out = run_generate_demo(steps=3, json_out=True, eval_n=2)
    assert out is not None
    assert set(out["judged"]) == {"fp32", "quantized"} and out["judged"]["fp32"]["images"] == 2
    assert Path(out["sample"]["file"]).is_file() and isinstance(out["sample"]["seed"], int)
    assert out["image_vs_fp32"]["images"] >= 1
