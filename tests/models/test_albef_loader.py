"""ALBEF checkpoints in the official key layout (salesforce/ALBEF) -> mmedge export -> parity.

The file is written here, with the names of ALBEF's pre-training checkpoint: `visual_encoder.*`
(timm ViT), `text_encoder.bert.*` and the MLM head `text_encoder.cls.*`, `vision_proj`,
`text_proj`, `itm_head`, `temp`, the momentum copies `*_m` and the queues, inside the
{"model": ...} dictionary that ALBEF's training script saves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models.albef.modeling import Albef, AlbefConfig

TEXTS = ["a red circle", "a small blue square at the top left", "two stars", "a large green star"]


def _config(vocab: int) -> dict:
    return {
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "mlp_dim": 64},
        "text": {
            "vocab_size": vocab,
            "hidden": 32,
            "layers": 4,
            "heads": 2,
            "intermediate": 64,
            "max_positions": 40,
            "encoder_hidden": 32,
            "fusion_from": 2,
        },
        "embed_dim": 16,
        "temp": 0.05,
    }


def _official_name(name: str) -> str:
    """mmedge's name -> ALBEF's (written out here, independently of the loader's table)."""
    vit = {
        "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
        "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
    }
    if name in vit:
        return vit[name]
    m = re.fullmatch(r"vision_model\.embeddings\.patch_embedding\.(\w+)", name)
    if m:
        return f"visual_encoder.patch_embed.proj.{m[1]}"
    m = re.fullmatch(r"vision_model\.post_layernorm\.(\w+)", name)
    if m:
        return f"visual_encoder.norm.{m[1]}"
    m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)", name)
    if m:
        part = {
            "layer_norm1": "norm1",
            "layer_norm2": "norm2",
            "self_attn.qkv": "attn.qkv",
            "self_attn.projection": "attn.proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        module, leaf = m[2].rsplit(".", 1)
        return f"visual_encoder.blocks.{m[1]}.{part[module]}.{leaf}"
    if name.startswith("text_encoder."):
        return "text_encoder.bert." + name[len("text_encoder.") :]
    assert name in ("temp",) or name.split(".")[0] in ("vision_proj", "text_proj", "itm_head"), name
    return name


def _official_state(model: Albef) -> dict[str, torch.Tensor]:
    state = {_official_name(k): v.clone() for k, v in model.state_dict().items()}
    assert "visual_encoder.blocks.1.attn.qkv.weight" in state
    assert "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight" in state
    assert "text_encoder.bert.embeddings.token_type_embeddings.weight" in state
    # What only training reads: momentum copies, queues, BERT's position ids, the MLM head.
    for k in list(state):
        top, _, rest = k.partition(".")
        if top in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"):
            state[f"{top}_m.{rest}"] = torch.randn_like(state[k])
    d, q = model.cfg.embed_dim, 64
    state.update(
        image_queue=torch.randn(d, q),
        text_queue=torch.randn(d, q),
        idx_queue=torch.full((1, q), -100),
        queue_ptr=torch.zeros(1, dtype=torch.long),
    )
    state["text_encoder.bert.embeddings.position_ids"] = torch.arange(40)[None]
    h, v = model.cfg.text.hidden, model.cfg.text.vocab_size
    state["text_encoder.cls.predictions.bias"] = torch.zeros(v)
    state["text_encoder.cls.predictions.transform.dense.weight"] = torch.randn(h, h)
    state["text_encoder.cls.predictions.decoder.weight"] = torch.randn(v, h)
    return state


@pytest.fixture(scope="module")
def albef(tmp_path_factory: pytest.TempPathFactory):
    from tokenizers import Tokenizer

    from mmedge import sdk
    from mmedge.models.init import tiny_tokenizer_json
    from mmedge.sdk.cli import main

    root = tmp_path_factory.mktemp("albef")
    tok = tiny_tokenizer_json(generative=False)
    (root / "tokenizer.json").write_text(tok)
    raw = _config(Tokenizer.from_str(tok).get_vocab_size())
    (root / "albef.json").write_text(json.dumps(raw))
    torch.manual_seed(0)
    model = Albef(AlbefConfig.from_dict(raw)).eval()
    with torch.no_grad():  # spread the match scores, so that the ITM check has teeth
        model.itm_head.weight.normal_(0, 2.0)
        model.vision_model.embeddings.class_embedding.normal_(0, 1.0)
    ckpt = {"model": _official_state(model), "epoch": 3, "config": {"queue_size": 64, "alpha": 0.4}}
    torch.save(ckpt, root / "ALBEF.pth")
    args = ["export", str(root / "ALBEF.pth"), "--family", "albef", "--config", str(root / "albef.json")]
    assert main([*args, "--allow-pickle", "--out", str(root / "pkg")]) == 0
    return model, sdk.Pipeline(str(root / "pkg")), root


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _scenes(n: int, size: int) -> list[np.ndarray]:
    from mmedge.data import HELD_OUT_SEED, generate_scenes

    return [s.image for s in generate_scenes(n, HELD_OUT_SEED, image_size=size)]


def test_exported_components_match_the_pytorch_model(albef) -> None:
    from mmedge.runtime.images import preprocess

    model, pipe, _ = albef
    m = pipe.runner.manifest
    assert (m.family, m.variant, set(m.components)) == ("albef", "itm", {"vision", "text", "itm"})
    assert m.retrieval is not None and m.retrieval.logit_scale == pytest.approx(1 / 0.05, rel=1e-5)
    images = _scenes(4, 32)
    px = torch.from_numpy(preprocess(images, pipe.preprocess))
    ids, mask = (torch.from_numpy(x) for x in pipe.runner.tokenizer.encode_batch(TEXTS))
    with torch.no_grad():
        ref_img, features = model.encode_image(px)
        ref_txt = model.encode_text(ids, mask)
        ref_itm = model.itm_logits(features, ids, mask).softmax(-1)[:, 1].numpy()
    assert _row_cosine(pipe.embed_images(images), ref_img.numpy()).min() >= 0.9999
    assert _row_cosine(pipe.embed_texts(TEXTS), ref_txt.numpy()).min() >= 0.9999
    ours_itm = pipe.itm_scores(images, TEXTS)
    assert np.abs(ours_itm - ref_itm).max() <= 1e-4
    assert ref_itm.max() - ref_itm.min() > 0.05
    values = pipe._image_values(images, "RGB")  # the ITM's input, the vision graph's second output
    assert (
        _row_cosine(values["image_features"].reshape(4, -1), features.reshape(4, -1).numpy()).min() >= 0.9999
    )


def test_safetensors_and_retrieval_fine_tune_layout_load(albef, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mmedge.models.sources import load_source

    model, _, root = albef
    state = torch.load(root / "ALBEF.pth", weights_only=True)["model"]
    # retrieval fine-tunes hold a BertModel: `text_encoder.*` without `bert.`, and no MLM head
    tuned = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in state.items()}
    tuned = {k: v.contiguous() for k, v in tuned.items() if ".cls." not in k}
    save_file(tuned, str(tmp_path / "mscoco.safetensors"))
    lm = load_source(
        tmp_path / "mscoco.safetensors",
        family="albef",
        config=root / "albef.json",
        tokenizer=root / "tokenizer.json",
    )
    assert lm.source["kind"] == "official"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(lm.model.state_dict()[k], v)


def test_unexpected_keys_pickles_and_missing_family_are_refused(albef, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mmedge.models.sources import load_source

    _, _, root = albef
    opts = {"config": root / "albef.json", "tokenizer": root / "tokenizer.json"}
    with pytest.raises(UnsupportedError, match="pickle"):
        load_source(root / "ALBEF.pth", family="albef", **opts)
    with pytest.raises(ConfigError, match="--family"):
        load_source(root / "ALBEF.pth", allow_pickle=True, **opts)
    with pytest.raises(UnsupportedError, match="official"):
        load_source(root / "ALBEF.pth", family="clip", allow_pickle=True, **opts)
    state = torch.load(root / "ALBEF.pth", weights_only=True)["model"]
    state["visual_encoder.head.weight"] = torch.zeros(10, 32)  # a classifier ALBEF does not have
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"not part of ALBEF's layout.*visual_encoder\.head\.weight"):
        load_source(tmp_path / "other.safetensors", family="albef", **opts)
    del state["visual_encoder.head.weight"], state["itm_head.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ConfigError, match=r"missing \['itm_head.bias'\]"):
        load_source(tmp_path / "short.safetensors", family="albef", **opts)
