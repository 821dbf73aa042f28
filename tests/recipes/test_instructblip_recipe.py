"""`mmedge train --preset instructblip-tiny --init BLIP2_CHECKPOINT`: a few steps from a random
blip2-tiny, then export and chat; what stays frozen, what learns, and what the recipe refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from mmedge.models.init import init_checkpoint
    from mmedge.recipes.base import TrainRequest, train_model

    root = tmp_path_factory.mktemp("instructblip-tiny")
    blip2 = init_checkpoint("blip2-tiny", root / "blip2", seed=0)
    request = TrainRequest(preset="instructblip-tiny", init=str(blip2), steps=4, batch_size=8, threads=1)
    return blip2, train_model(root / "ckpt", request, progress=False)


def test_frozen_parts_stay_and_the_qformer_learns(trained: tuple[Path, Path]) -> None:
    from mmedge.models.checkpoint import INSTRUCTION_TOKENIZER_NAME, TOKENIZER_NAME, read_checkpoint_meta
    from mmedge.models.sources import load_source

    blip2, ckpt = trained
    before, after = load_source(blip2).model.state_dict(), load_source(ckpt).model.state_dict()
    assert before.keys() == after.keys()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"qformer", "qformer_text", "query_tokens", "language_projection"}
    meta = read_checkpoint_meta(ckpt)
    assert meta["family"] == "instructblip" and meta["config"]["prompt_template"] == "Question: {} Answer:"
    assert meta["train"]["steps"] == 4 and meta["train"]["pool"]["scenes"] == 32  # 4 steps x 8 rows
    # the instruction tokenizer is the blip2 one, the Q-Former's vocabulary
    assert (ckpt / INSTRUCTION_TOKENIZER_NAME).read_text() == (blip2 / TOKENIZER_NAME).read_text()


def test_the_checkpoint_exports_and_chats(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from mmedge import sdk
    from mmedge.data import HELD_OUT_SEED, generate_scenes
    from mmedge.export.exporter import export_model

    _, ckpt = trained
    export_model(ckpt, tmp_path / "pkg")
    pipe = sdk.Pipeline(str(tmp_path / "pkg"), precision="fp32")
    m = pipe.runner.manifest
    assert m.family == "instructblip" and m.reads_instruction()
    assert m.prompt.first_turn == "{image}{bos}Question: {prompt} Answer:"
    image = generate_scenes(1, HELD_OUT_SEED)[0].image
    answer = pipe.chat(image, "how many shapes are there?", max_new_tokens=3, min_new_tokens=3)
    assert isinstance(answer, str) and answer.strip()
    # the question reaches the Q-Former: two questions, two image prefixes
    _, a = pipe.image_prefix(image, "RGB", "how many shapes are there?")
    _, b = pipe.image_prefix(image, "RGB", "what colour is the circle?")
    assert np.abs(a - b).max() > 1e-4


def test_the_recipe_starts_from_a_trained_blip2(tmp_path: Path) -> None:
    from mmedge.errors import ConfigError
    from mmedge.models.init import init_checkpoint
    from mmedge.recipes.base import TrainRequest, train_model

    with pytest.raises(ConfigError, match="--init BLIP2_CHECKPOINT"):
        train_model(tmp_path / "x", TrainRequest(preset="instructblip-tiny"))
    clip = init_checkpoint("clip-tiny", tmp_path / "clip")
    with pytest.raises(ConfigError, match="is a 'clip' model"):
        train_model(tmp_path / "x", TrainRequest(preset="instructblip-tiny", init=str(clip), steps=1))
    with pytest.raises(ConfigError, match="--data"):
        train_model(tmp_path / "x", TrainRequest(preset="instructblip-tiny", init=str(clip), data="shapes:4"))
