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
    # image-to-image in pixel space noises the image itself: it draws the same from the same seed,
    # and another image draws another result
    again = [
        pipe.generate("a large red circle", steps=4, seed=1, image=out.pixels, strength=0.5) for _ in "ab"
    ]
    other = pipe.generate("a large red circle", steps=4, seed=1, image=255 - out.pixels, strength=0.5)
    assert again[0].strength == 0.5 and np.array_equal(again[0].image, again[1].image)
    assert float(np.abs(other.image - again[0].image).mean()) > 1e-2
    scores = evaluate_generation(pipe, n=3, steps=2)
    assert scores["images"] == 3 and scores["steps"] == 2 and 0 <= scores["colour_and_shape"] <= 1


def test_the_recipe_refuses_user_data(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="synthetic"):
        train_model(tmp_path / "ckpt", TrainRequest("sd-tiny", steps=1, data="shapes:4"))


def test_the_loss_weighs_the_object_and_its_rim() -> None:
    import torch

    from mmedge.data import render
    from mmedge.data.scenes import SceneObject
    from mmedge.evaluation.drawn_scenes import judge
    from mmedge.recipes.sd import FOREGROUND_WEIGHT, foreground_weights

    obj = SceneObject("star", "red", "small", "top left")
    image = render([obj], 32, np.random.default_rng(0))
    assert judge(image).object == obj
    x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    w = foreground_weights(x)[0, 0].numpy()
    found = (image.max(-1).astype(int) - image.min(-1)) > 60
    assert set(np.unique(w)) == {1.0, FOREGROUND_WEIGHT}
    assert (w[found] == FOREGROUND_WEIGHT).all()  # every object pixel
    heavy = w == FOREGROUND_WEIGHT
    assert found.sum() < heavy.sum() < 3 * found.sum()  # plus a rim, not the whole image
    assert not heavy[16:, 16:].any()  # nothing far from the object
    # in a batch, a small object and a large one carry the same total extra weight
    big = render([SceneObject("square", "blue", "large", "bottom right")], 32, np.random.default_rng(1))
    pair = torch.from_numpy(np.stack([image, big]).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    extra = (foreground_weights(pair) - 1).sum((1, 2, 3))
    assert torch.allclose(extra[0], extra[1], rtol=1e-5) and float(extra[0]) > 0
