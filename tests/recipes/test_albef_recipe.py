"""The albef recipe's pieces: momentum update, queues, a few steps end to end, and the re-rank eval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.recipes import albef as recipe
from mmedge.recipes import itc_itm
from mmedge.recipes.base import TrainRequest, train_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("albef") / "ckpt"
    return train_model(
        out, TrainRequest(preset="albef-tiny", steps=3, batch_size=16, threads=1), progress=False
    )


def test_a_few_steps_write_the_model_alone(trained: Path) -> None:
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.models.sources import load_source

    lm = load_source(trained)
    assert lm.family.name == "albef"
    names = set(lm.model.state_dict())
    assert "temp" in names and not any("_m." in n or "queue" in n or "mlm" in n for n in names)
    info = read_checkpoint_meta(trained)["train"]
    assert (info["steps"], info["batch_size"], info["hard_negatives"]) == (3, 16, 8)
    assert "[MASK]" in lm.tokenizer_json


@pytest.mark.parametrize("negatives", [1, 2])
def test_momentum_moves_toward_the_model_and_queues_fill(
    negatives: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmedge.models.albef.modeling import Albef, AlbefConfig
    from mmedge.models.init import tiny_tokenizer_json
    from mmedge.runtime.sections import PreprocessConfig
    from mmedge.runtime.texts import TextTokenizer

    raw = {
        "vision": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        "text": {"vocab_size": 300, "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64,
                 "max_positions": 32, "encoder_hidden": 32, "fusion_from": 1},
        "embed_dim": 16,
    }  # fmt: skip
    torch.manual_seed(0)
    monkeypatch.setattr(itc_itm, "ITM_NEGATIVES", negatives)
    training = recipe.AlbefTraining(Albef(AlbefConfig.from_dict(raw)), mask_id=299, steps=10)
    online = training.online.model.vision_proj.weight
    with torch.no_grad():
        online.add_(1.0)  # the momentum copy now lags by exactly 1
    before = training.momentum.model.vision_proj.weight.clone()
    tok = TextTokenizer.from_json(tiny_tokenizer_json(generative=False), context_length=32, pad_id=0)
    batches = itc_itm.scene_batches(
        tok, PreprocessConfig(32, (0.5,) * 3, (0.5,) * 3, resize="exact"), 8, 2, 0
    )
    loss = training.loss(next(batches))
    assert torch.isfinite(loss)
    moved = training.momentum.model.vision_proj.weight - before
    torch.testing.assert_close(moved, torch.full_like(moved, 1 - itc_itm.MOMENTUM))
    assert training.ptr == 8 and (training.idx_queue[0, :8] != -1).all()


def test_recipe_refuses_what_it_does_not_train(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="synthetic"):
        train_model(tmp_path / "x", TrainRequest(preset="albef-tiny", data="shapes:4"))
    with pytest.raises(ConfigError, match="queue"):
        train_model(tmp_path / "y", TrainRequest(preset="albef-tiny", batch_size=24, steps=1))


def test_hard_negative_gallery_pairs_each_scene_with_a_one_attribute_edit() -> None:
    from mmedge.evaluation.tasks import hard_negative_gallery

    texts, query_keys, images, keys = hard_negative_gallery(20, 32)
    assert len(texts) == 20 and len(images) == len(keys) == 40
    assert keys[:20] == query_keys
    for a, b in zip(keys[:20], keys[20:]):
        assert a != b and len(a) == len(b)  # the same objects, one attribute of one changed
    # several edits per scene: the first of each is the one-edit gallery's
    _, _, images3, keys3 = hard_negative_gallery(20, 32, edits=3)
    assert len(images3) == len(keys3) == 80 and keys3[:20] == keys[:20]
    assert keys3[20::3] == keys[20:]
    np.testing.assert_array_equal(np.stack(images3[20::3]), np.stack(images[20:]))
    assert all(k != keys[i // 3] for i, k in enumerate(keys3[20:]))


def test_init_from_a_clip_checkpoint_starts_the_vit(tiny_ckpt: Path, tmp_path: Path) -> None:
    """`--init CLIP`: the ViT and the image projection start from the CLIP checkpoint's."""
    from mmedge.models.sources import load_source

    clip = load_source(tiny_ckpt)
    lr = 1e-12  # so the short run leaves the copied weights (nearly) as they were
    out = train_model(
        tmp_path / "a",
        TrainRequest(preset="albef-tiny", init=str(tiny_ckpt), steps=2, batch_size=16, threads=1, lr=lr),
    )
    albef = load_source(out)
    assert albef.config.vision.tower == "clip"
    for name, w in clip.model.vision_model.state_dict().items():
        torch.testing.assert_close(albef.model.vision_model.state_dict()[name], w, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        albef.model.vision_proj.weight, clip.model.visual_projection.weight, atol=1e-6, rtol=0
    )
    with pytest.raises(ConfigError, match="clip"):
        train_model(tmp_path / "b", TrainRequest(preset="albef-tiny", init=str(out), steps=1))


def test_rerank_eval_reports_both_figures(trained: Path, tmp_path: Path) -> None:
    from mmedge import sdk
    from mmedge.evaluation.tasks import evaluate_rerank
    from mmedge.export.exporter import export_model

    export_model(trained, tmp_path / "pkg")
    out = evaluate_rerank(sdk.Pipeline(str(tmp_path / "pkg")), n=12, depth=4)
    assert (out["queries"], out["gallery"], out["depth"]) == (12, 24, 4)
    for key in ("t2i_r1_contrastive", "t2i_r1_rerank"):
        assert 0.0 <= out[key] <= 1.0
    assert np.isfinite(out["t2i_r1_rerank"])
