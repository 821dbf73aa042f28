"""The imagebind recipe: clip towers copied exactly and kept frozen, the other encoders trained
against the image space only, and the loss's positives taken per modality."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mmedge.errors import ConfigError
from mmedge.recipes import imagebind as recipe
from mmedge.recipes.base import TrainRequest, train_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    out = tmp_path_factory.mktemp("imagebind") / "ckpt"
    pool = recipe.POOL
    recipe.POOL = 16
    try:
        return train_model(
            out,
            TrainRequest(preset="imagebind-tiny", init=str(tiny_ckpt), steps=2, batch_size=8, threads=1),
            progress=False,
        )
    finally:
        recipe.POOL = pool


def test_vision_and_text_are_the_clip_towers_unchanged(trained: Path, tiny_ckpt: Path) -> None:
    """Training moved the audio, depth, thermal and IMU encoders and left the clip towers alone:
    the imagebind image and text embeddings equal clip-tiny's."""
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.models.sources import load_source

    ib, clip = load_source(trained).model, load_source(tiny_ckpt).model
    pixels = torch.randn(3, 3, 64, 64)
    ids = torch.tensor([[1, 7, 9, 3] + [0] * 28, [1, 3] + [0] * 30])
    with torch.no_grad():
        img = torch.nn.functional.cosine_similarity(ib.encode_image(pixels), clip.encode_image(pixels))
        txt = torch.nn.functional.cosine_similarity(
            ib.encode_text(ids, ids != 0), clip.encode_text(ids, ids != 0)
        )
    assert img.min() > 0.9999 and txt.min() > 0.9999
    info = read_checkpoint_meta(trained)["train"]
    assert info["frozen"] == ["vision", "text"] and info["trained"] == ["audio", "depth", "thermal", "imu"]
    assert info["steps"] == 2 and info["pool"] == 16
    # every trained encoder moved from its initial weights (the recipe's seed, the same config)
    loaded = load_source(trained)
    torch.manual_seed(0)
    start = loaded.family.build(loaded.config).state_dict()
    for m in ("audio", "depth", "thermal", "imu"):
        assert not torch.equal(start[f"{m}.projection.weight"], ib.state_dict()[f"{m}.projection.weight"]), m


def test_depth_positives_ignore_colour() -> None:
    """Two scenes that differ only in colour are one depth positive: swapping their images
    changes nothing in the depth loss, while the audio loss tells them apart."""
    idx = torch.arange(2)
    emb = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    pool = {"image": emb, "depth": torch.zeros(2, 1), "depth_key": torch.tensor([5, 5])}
    pool.update(audio=torch.zeros(2, 1), audio_key=torch.tensor([1, 2]))

    class Enc(torch.nn.Module):
        def __init__(self, out: torch.Tensor):
            super().__init__()
            self.out = out
            self.log_logit_scale = torch.tensor(0.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out

    model = torch.nn.Module()
    model.depth, model.audio = Enc(emb), Enc(emb)
    swapped = {**pool, "image": emb.flip(0)}
    depth = [recipe.binding_loss(model, p, idx, ["depth"]) for p in (pool, swapped)]
    audio = [recipe.binding_loss(model, p, idx, ["audio"]) for p in (pool, swapped)]
    assert torch.allclose(depth[0], depth[1]) and not torch.allclose(audio[0], audio[1])


def test_refuses_without_a_clip_to_start_from(tmp_path: Path, trained: Path) -> None:
    with pytest.raises(ConfigError, match="--init"):
        recipe.train(tmp_path / "x", TrainRequest(preset="imagebind-tiny"))
    with pytest.raises(ConfigError, match="not a clip checkpoint"):
        recipe.train(tmp_path / "x", TrainRequest(preset="imagebind-tiny", init=str(trained)))
