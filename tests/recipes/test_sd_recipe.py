"""The sd-tiny recipe trains a pixel-space model that exports, draws and is judged end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from mmedge import sdk
from mmedge.errors import UnsupportedError
from mmedge.evaluation.drawn_scenes import evaluate_generation
from mmedge.export.exporter import export_model
from mmedge.models.checkpoint import read_checkpoint_meta
from mmedge.recipes.base import TrainRequest, train_model


def test_sd_tiny_trains_exports_and_draws(tmp_path: Path) -> None:
    ckpt = train_model(tmp_path / "ckpt", TrainRequest("sd-tiny", steps=4, batch_size=4), progress=False)
    record = read_checkpoint_meta(ckpt)["train"]
    assert record["steps"] == 4 and np.isfinite(record["final_loss"])
    manifest = export_model(ckpt, tmp_path / "pkg")
    assert manifest.variant == "pixel" and not manifest.has_role("vae_decoder")
    pipe = sdk.Pipeline(tmp_path / "pkg")
    out = pipe.generate("a large red circle at the top left", steps=3, seed=0)
    assert out.pixels.shape == (32, 32, 3)
    scores = evaluate_generation(pipe, n=3, steps=2)
    assert scores["images"] == 3 and scores["steps"] == 2 and 0 <= scores["colour_and_shape"] <= 1


def test_the_recipe_refuses_user_data(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="synthetic"):
        train_model(tmp_path / "ckpt", TrainRequest("sd-tiny", steps=1, data="shapes:4"))
