"""The blip recipe: ITC + ITM + LM from a CLIP ViT, its two checkpoints and what it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mmedge.errors import ConfigError, InvalidInputError, UnsupportedError
from mmedge.recipes import blip as recipe
from mmedge.recipes.base import TrainRequest, train_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    out = tmp_path_factory.mktemp("blip") / "ckpt"
    request = TrainRequest(preset="blip-tiny", init=str(tiny_ckpt), steps=3, batch_size=16, threads=1)
    return train_model(out, request, progress=False)


def test_two_checkpoints_share_the_vit_and_the_tokenizer(trained: Path, tiny_ckpt: Path) -> None:
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.models.sources import load_source

    itm, caption = load_source(trained), load_source(recipe.task_checkpoint_path(trained, "caption"))
    vqa = load_source(recipe.task_checkpoint_path(trained, "vqa"))
    assert (itm.config.variant, caption.config.variant, vqa.config.variant) == ("itm", "caption", "vqa")
    assert vqa.tokenizer_json == itm.tokenizer_json
    info = read_checkpoint_meta(trained)["train"]
    assert (info["steps"], info["vqa"]["steps"]) == (3, 3)
    assert itm.tokenizer_json == caption.tokenizer_json and recipe.DEC_TOKEN in itm.tokenizer_json
    for name, w in itm.model.vision_model.state_dict().items():
        torch.testing.assert_close(caption.model.vision_model.state_dict()[name], w, atol=0, rtol=0)
    names = set(itm.model.state_dict())
    assert not any("queue" in n or "decoder" in n for n in names)
    assert read_checkpoint_meta(trained)["train"]["init"] == str(tiny_ckpt)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(itm.tokenizer_json)
    assert caption.config.bos_token_id == tok.token_to_id(recipe.DEC_TOKEN)
    assert caption.config.sep_token_id == tok.token_to_id("<|endoftext|>")


def test_lm_loss_reads_dec_caption_end(trained: Path) -> None:
    """The decoder learns [DEC] caption [end]: after a few steps on one fixed batch its loss falls."""
    from mmedge.models.sources import load_source
    from mmedge.recipes.itc_itm import scene_batches
    from mmedge.runtime.texts import TextTokenizer

    src = load_source(trained)
    cfg = src.config
    tok = TextTokenizer.from_json(src.tokenizer_json, context_length=cfg.text.max_positions - 1, pad_id=0)
    batch = next(scene_batches(tok, src.family.preprocess(cfg), 8, 2, 0))
    from mmedge.models.blip.decoder import BlipTextDecoder

    torch.manual_seed(0)
    training = recipe.BlipTraining(src.model, BlipTextDecoder(cfg.text), cfg.bos_token_id, 10, False)
    opt = torch.optim.Adam(training.online.decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = training.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_recipe_refuses_what_it_does_not_train(tmp_path: Path, tiny_ckpt: Path, trained: Path) -> None:
    with pytest.raises(ConfigError, match="--init CLIP_CHECKPOINT"):
        train_model(tmp_path / "a", TrainRequest(preset="blip-tiny", steps=1))
    with pytest.raises(ConfigError, match="clip"):
        train_model(tmp_path / "b", TrainRequest(preset="blip-tiny", init=str(trained), steps=1))
    with pytest.raises(UnsupportedError, match="synthetic"):
        train_model(tmp_path / "c", TrainRequest(preset="blip-tiny", init=str(tiny_ckpt), data="shapes:4"))
    # the caption checkpoint's place holds something else: refused before any training
    (tmp_path / "d-caption").mkdir()
    (tmp_path / "d-caption" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="d-caption"):
        train_model(tmp_path / "d", TrainRequest(preset="blip-tiny", init=str(tiny_ckpt), steps=1))
    assert (tmp_path / "d-caption" / "notes.txt").read_text() == "mine"
