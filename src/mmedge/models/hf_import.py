"""Import Hugging Face model directories without importing transformers.

Reads config.json, preprocessor_config.json, tokenizer.json and safetensors weights (single
or sharded), maps the HF config onto an mmedge family config and the weights onto its modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models.checkpoint import load_weights
from mmedge.models.checkpoint import read_json_object as _json

# HF model_type -> mmedge family
HF_FAMILIES = {"clip": "clip"}
_PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as preprocessor_config.json stores it


@dataclass(frozen=True)
class HFSource:
    family: str
    config: dict[str, Any]  # mmedge family config (JSON form)
    state: dict[str, torch.Tensor]
    tokenizer_json: str
    preprocess: dict[str, Any]
    weight_files: tuple[Path, ...]


def is_hf_dir(path: str | Path) -> bool:
    """An HF model directory has a config.json with a `model_type` (mmedge checkpoints have `format`)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return "model_type" in json.loads(p.read_text())
    except ValueError:
        return False


def hf_family(path: str | Path) -> str:
    """Detect the mmedge family of an HF directory from its config's model_type."""
    model_type = _json(Path(path) / "config.json").get("model_type")
    if model_type not in HF_FAMILIES:
        raise UnsupportedError(f"HF model_type {model_type!r} is not supported; supported: {sorted(HF_FAMILIES)}")
    return HF_FAMILIES[model_type]


def _weight_files(root: Path, allow_pickle: bool) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_json(index).get("weight_map", {}).values()))
        files = [root / s for s in shards]
        for f in files:
            if f.parent != root:
                raise ConfigError(f"{index}: shard {f.name!r} must lie in the model directory")
        return files
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    if (root / "pytorch_model.bin").is_file():
        if not allow_pickle:
            load_weights(root / "pytorch_model.bin", allow_pickle=False)  # raises the explanatory error
        return [root / "pytorch_model.bin"]
    raise ConfigError(f"{root} has no model.safetensors (or sharded index); nothing to import")


def _clip_config(cfg: dict[str, Any]) -> dict[str, Any]:
    t, v = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    eps_t, eps_v = t.get("layer_norm_eps", 1e-5), v.get("layer_norm_eps", 1e-5)
    if eps_t != eps_v:
        raise UnsupportedError(f"different layer_norm_eps for text ({eps_t}) and vision ({eps_v}) is not supported")
    return {
        "vision": {
            "image_size": v.get("image_size", 224), "patch_size": v.get("patch_size", 32),
            "width": v.get("hidden_size", 768), "layers": v.get("num_hidden_layers", 12),
            "heads": v.get("num_attention_heads", 12), "mlp_dim": v.get("intermediate_size", 3072),
            "act": v.get("hidden_act", "quick_gelu"),
        },
        "text": {
            "vocab_size": t.get("vocab_size", 49408), "context_length": t.get("max_position_embeddings", 77),
            "width": t.get("hidden_size", 512), "layers": t.get("num_hidden_layers", 12),
            "heads": t.get("num_attention_heads", 8), "mlp_dim": t.get("intermediate_size", 2048),
            "act": t.get("hidden_act", "quick_gelu"), "eos_token_id": t.get("eos_token_id", 49407),
            "pad_token_id": t.get("pad_token_id", 1),
        },
        "projection_dim": cfg.get("projection_dim", 512),
        "layer_norm_eps": eps_v,
        "logit_scale_init": cfg.get("logit_scale_init_value", 2.6592),
    }


def _clip_preprocess(root: Path, image_size: int) -> dict[str, Any]:
    from mmedge.models.clip import CLIP_MEAN, CLIP_STD

    p = root / "preprocessor_config.json"
    pc = _json(p) if p.is_file() else {}
    # Settings the runtime does not reproduce would change every embedding silently: refuse them.
    wrong = [f"{k}={pc[k]!r}" for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
             if pc.get(k, True) is not True]
    if pc.get("resample", _PIL_BICUBIC) != _PIL_BICUBIC:
        wrong.append(f"resample={pc['resample']!r}")
    if wrong:
        raise UnsupportedError(
            f"{p}: {', '.join(wrong)} is not supported; accepted: bicubic (resample={_PIL_BICUBIC}) "
            "shortest-edge resize, centre crop, rescale and normalise, all enabled"
        )
    size = pc.get("size", {"shortest_edge": image_size})
    if isinstance(size, dict) and "shortest_edge" not in size:
        raise UnsupportedError(f"{p}: size {size} resizes without keeping the aspect ratio; only shortest_edge is supported")
    shortest = size["shortest_edge"] if isinstance(size, dict) else int(size)
    crop = pc.get("crop_size", {"height": image_size, "width": image_size})
    crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (int(crop), int(crop))
    if shortest != image_size or crop != (image_size, image_size):
        raise UnsupportedError(
            f"preprocessor resizes to {shortest} and crops {crop}, but the model takes {image_size}; "
            "only resize == crop == image_size is supported"
        )
    return {
        "image_size": image_size, "mean": list(pc.get("image_mean", CLIP_MEAN)), "std": list(pc.get("image_std", CLIP_STD)),
        "resize": "shortest", "crop": "center", "rescale": pc.get("rescale_factor", 1 / 255),
    }


def load_hf(path: str | Path, allow_pickle: bool = False) -> HFSource:
    """Read an HF model directory into an mmedge family config + state dict."""
    root = Path(path)
    family = hf_family(root)
    cfg = _json(root / "config.json")
    config = _clip_config(cfg)
    files = _weight_files(root, allow_pickle)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_weights(f, allow_pickle=allow_pickle))
    # Buffers HF used to persist; ours are computed.
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    tok = root / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(f"{root} has no tokenizer.json; save the tokenizer with a fast (Rust) tokenizer")
    tokenizer_json = tok.read_text()
    _check_vocab(tok, tokenizer_json, config["text"]["vocab_size"])
    return HFSource(family, config, state, tokenizer_json, _clip_preprocess(root, config["vision"]["image_size"]), tuple(files))


def _check_vocab(path: Path, tokenizer_json: str, vocab_size: int) -> None:
    """Every id the tokenizer can emit must index the text embedding table (else export hits an IndexError)."""
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True).values()
    except Exception as exc:  # tokenizers raises bare Exception for malformed JSON
        raise ConfigError(f"{path} is not a readable tokenizer: {exc}") from exc
    top = max(ids, default=-1)
    if top >= vocab_size:
        raise ConfigError(f"{path} emits token ids up to {top}, but text_config.vocab_size is {vocab_size}")
