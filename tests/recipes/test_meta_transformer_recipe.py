"""The meta-transformer recipe: clip's vision trunk as the frozen shared encoder (byte-identical
after training), tokenizers and heads trained on the synthetic tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mmedge.data.modalities import labelled_examples
from mmedge.errors import ConfigError
from mmedge.recipes import meta_transformer as recipe
from mmedge.recipes.base import TrainRequest, train_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    out = tmp_path_factory.mktemp("mt") / "ckpt"
    pool = recipe.POOL
    recipe.POOL = 8
    try:
        return train_model(
            out,
            TrainRequest(
                preset="meta-transformer-tiny", init=str(tiny_ckpt), steps=2, batch_size=4, threads=1
            ),
            progress=False,
        )
    finally:
        recipe.POOL = pool


def test_shared_encoder_is_clips_trunk_byte_for_byte(trained: Path, tiny_ckpt: Path) -> None:
    """The checkpoint's encoder hashes as the clip trunk loaded into a fresh model does, and as the
    recipe recorded before and after training; the heads moved."""
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.models.meta_transformer.loaders import load_clip_encoder
    from mmedge.models.meta_transformer.modeling import encoder_sha256
    from mmedge.models.sources import load_source

    loaded = load_source(trained)
    fresh = loaded.family.build(loaded.config)
    load_clip_encoder(fresh, tiny_ckpt)
    info = read_checkpoint_meta(trained)["train"]
    assert encoder_sha256(loaded.model) == encoder_sha256(fresh) == info["encoder_sha256"]["before"]
    assert info["encoder_sha256"]["after"] == info["encoder_sha256"]["before"]
    torch.manual_seed(0)
    start = loaded.family.build(loaded.config).state_dict()
    for m in ("points", "audio", "imu"):
        name = next(
            k for k in start if k.startswith(f"heads.{m}.") and k.endswith("weight") and start[k].ndim == 2
        )
        assert not torch.equal(start[name], loaded.model.state_dict()[name]), m


def test_tasks_are_labelled_as_the_preset_names_them() -> None:
    from mmedge.data.scenes import SHAPES

    for modality in ("audio", "imu"):
        raw, labels, names = labelled_examples(modality, 8, seed=3)
        assert names == SHAPES and list(labels) == [0, 1, 2, 3, 0, 1, 2, 3] and len(raw) == 8
    clouds, labels, names = labelled_examples("points", 6, seed=3)
    assert np.asarray(clouds[0]).shape == (1024, 3) and list(labels) == list(range(6))


def test_refuses_without_a_clip_to_start_from(tmp_path: Path, trained: Path) -> None:
    with pytest.raises(ConfigError, match="--init"):
        recipe.train(tmp_path / "x", TrainRequest(preset="meta-transformer-tiny"))
    with pytest.raises(ConfigError, match="not a clip checkpoint"):
        recipe.train(tmp_path / "x", TrainRequest(preset="meta-transformer-tiny", init=str(trained)))
