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
HF_FAMILIES = {"clip": "clip", "opt": "causal-lm", "llama": "causal-lm", "blip-2": "blip2"}
DEFAULT_MAX_CONTEXT = 256  # KV cache slots of an imported LM (capped by max_position_embeddings)
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
        raise UnsupportedError(
            f"HF model_type {model_type!r} is not supported; supported: {sorted(HF_FAMILIES)}"
        )
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
        raise UnsupportedError(
            f"different layer_norm_eps for text ({eps_t}) and vision ({eps_v}) is not supported"
        )
    return {
        "vision": {
            "image_size": v.get("image_size", 224),
            "patch_size": v.get("patch_size", 32),
            "width": v.get("hidden_size", 768),
            "layers": v.get("num_hidden_layers", 12),
            "heads": v.get("num_attention_heads", 12),
            "mlp_dim": v.get("intermediate_size", 3072),
            "act": v.get("hidden_act", "quick_gelu"),
        },
        "text": {
            "vocab_size": t.get("vocab_size", 49408),
            "context_length": t.get("max_position_embeddings", 77),
            "width": t.get("hidden_size", 512),
            "layers": t.get("num_hidden_layers", 12),
            "heads": t.get("num_attention_heads", 8),
            "mlp_dim": t.get("intermediate_size", 2048),
            "act": t.get("hidden_act", "quick_gelu"),
            "eos_token_id": t.get("eos_token_id", 49407),
            "pad_token_id": t.get("pad_token_id", 1),
        },
        "projection_dim": cfg.get("projection_dim", 512),
        "layer_norm_eps": eps_v,
        "logit_scale_init": cfg.get("logit_scale_init_value", 2.6592),
    }


def _image_preprocess(root: Path, image_size: int, exact_default: bool = False) -> dict[str, Any]:
    """preprocessor_config.json -> the manifest's preprocess section; refuses what the runtime cannot reproduce.

    CLIP's processor resizes the shortest edge and centre-crops; BLIP's resizes to height x width
    (`exact_default`: what to assume when the directory has no preprocessor_config.json).
    """
    from mmedge.models.clip import CLIP_MEAN, CLIP_STD

    p = root / "preprocessor_config.json"
    pc = _json(p) if p.is_file() else {}
    # Settings the runtime does not reproduce would change every embedding silently: refuse them.
    wrong = [
        f"{k}={pc[k]!r}" for k in ("do_resize", "do_rescale", "do_normalize") if pc.get(k, True) is not True
    ]
    if pc.get("resample", _PIL_BICUBIC) != _PIL_BICUBIC:
        wrong.append(f"resample={pc['resample']!r}")
    default = {"height": image_size, "width": image_size} if exact_default else {"shortest_edge": image_size}
    size = pc.get("size", default)
    exact = isinstance(size, dict) and "shortest_edge" not in size
    if not exact and pc.get("do_center_crop", True) is not True:
        wrong.append(f"do_center_crop={pc['do_center_crop']!r}")
    if wrong:
        raise UnsupportedError(
            f"{p}: {', '.join(wrong)} is not supported; accepted: bicubic (resample={_PIL_BICUBIC}) resize "
            "(shortest edge + centre crop, or height x width), rescale and normalise, all enabled"
        )
    if exact:
        got = (size.get("height"), size.get("width"))
        if got != (image_size, image_size):
            raise UnsupportedError(f"{p}: resizes to {got}, but the model takes {image_size}x{image_size}")
    else:
        shortest = size["shortest_edge"] if isinstance(size, dict) else int(size)
        crop = pc.get("crop_size", {"height": image_size, "width": image_size})
        crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (int(crop), int(crop))
        if shortest != image_size or crop != (image_size, image_size):
            raise UnsupportedError(
                f"preprocessor resizes to {shortest} and crops {crop}, but the model takes {image_size}; "
                "only resize == crop == image_size is supported"
            )
    return {
        "image_size": image_size,
        "mean": list(pc.get("image_mean", CLIP_MEAN)),
        "std": list(pc.get("image_std", CLIP_STD)),
        "resize": "exact" if exact else "shortest",
        "crop": "center",
        "rescale": pc.get("rescale_factor", 1 / 255),
    }


def _blip2_config(cfg: dict[str, Any], max_context: int | None) -> dict[str, Any]:
    v, q, t = cfg.get("vision_config") or {}, cfg.get("qformer_config") or {}, cfg.get("text_config") or {}
    if t.get("model_type", "opt") != "opt":
        raise UnsupportedError(
            f"BLIP-2 with a {t.get('model_type')!r} language model is not supported; OPT is"
        )
    if q.get("use_qformer_text_input"):
        raise UnsupportedError(
            "a Q-Former with text input (InstructBLIP-style) is not supported by the blip2 family"
        )
    width = v.get("hidden_size", 1408)
    return {
        "vision": {
            "style": "blip2",
            "image_size": v.get("image_size", 224),
            "patch_size": v.get("patch_size", 14),
            "width": width,
            "layers": v.get("num_hidden_layers", 39),
            "heads": v.get("num_attention_heads", 16),
            "mlp_dim": v.get("intermediate_size", 6144),
            "act": v.get("hidden_act", "gelu"),
            "eps": v.get("layer_norm_eps", 1e-6),
            "qkv_bias": v.get("qkv_bias", True),
        },
        "qformer": {
            "hidden": q.get("hidden_size", 768),
            "layers": q.get("num_hidden_layers", 12),
            "heads": q.get("num_attention_heads", 12),
            "intermediate": q.get("intermediate_size", 3072),
            "cross_attention_frequency": q.get("cross_attention_frequency", 2),
            "encoder_hidden": width,
            "num_query_tokens": cfg.get("num_query_tokens", 32),
            "act": q.get("hidden_act", "gelu"),
            "eps": q.get("layer_norm_eps", 1e-12),
        },
        "text": _decoder_config({"model_type": "opt", **t}, max_context),
    }


def _decoder_config(cfg: dict[str, Any], max_context: int | None = None) -> dict[str, Any]:
    """HF OPTConfig / LlamaConfig -> mmedge DecoderConfig (JSON form); refuses what we do not model."""
    model_type = cfg.get("model_type")
    positions = cfg.get("max_position_embeddings", 2048)
    common = {
        "vocab_size": cfg.get("vocab_size"),
        "hidden": cfg.get("hidden_size"),
        "layers": cfg.get("num_hidden_layers"),
        "heads": cfg.get("num_attention_heads"),
        "max_positions": positions,
        "max_context": min(max_context or DEFAULT_MAX_CONTEXT, positions),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
        "bos_token_id": cfg.get("bos_token_id", 2),
        "eos_token_id": cfg.get("eos_token_id", 2),
        "pad_token_id": cfg.get("pad_token_id", 1) if cfg.get("pad_token_id") is not None else 0,
    }
    if model_type == "opt":
        if not cfg.get("layer_norm_elementwise_affine", True):
            raise UnsupportedError("OPT with layer_norm_elementwise_affine=false is not supported")
        if cfg.get("_remove_final_layer_norm", False):
            raise UnsupportedError("OPT with _remove_final_layer_norm is not supported")
        proj = cfg.get("word_embed_proj_dim", common["hidden"])
        return {
            **common,
            "style": "opt",
            "ffn_dim": cfg.get("ffn_dim", 3072),
            "act": cfg.get("activation_function", "relu"),
            "word_embed_proj_dim": 0 if proj == common["hidden"] else proj,
            "bias": cfg.get("enable_bias", True),
            "do_layer_norm_before": cfg.get("do_layer_norm_before", True),
            "norm_eps": 1e-5,
        }
    if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise UnsupportedError(
            f"rope scaling {cfg.get('rope_scaling') or cfg.get('rope_parameters')} is not supported"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedError("Llama with attention_bias or mlp_bias is not supported")
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return {
        **common,
        "style": "llama",
        "ffn_dim": cfg.get("intermediate_size"),
        "act": cfg.get("hidden_act", "silu"),
        "kv_heads": cfg.get("num_key_value_heads") or 0,
        "norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "rope_theta": float(theta),
        "bias": False,
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
    }


def load_hf(path: str | Path, allow_pickle: bool = False, max_context: int | None = None) -> HFSource:
    """Read an HF model directory into an mmedge family config + state dict."""
    root = Path(path)
    family = hf_family(root)
    cfg = _json(root / "config.json")
    files = _weight_files(root, allow_pickle)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_weights(f, allow_pickle=allow_pickle))
    # Buffers HF used to persist; ours are computed.
    state = {k: v for k, v in state.items() if not k.endswith(("position_ids", "rotary_emb.inv_freq"))}
    if family == "clip":
        config, vocab = _clip_config(cfg), cfg.get("text_config", {}).get("vocab_size", 49408)
        preprocess = _image_preprocess(root, config["vision"]["image_size"])
    elif family == "blip2":
        config = _blip2_config(cfg, max_context)
        vocab, preprocess = (
            config["text"]["vocab_size"],
            _image_preprocess(root, config["vision"]["image_size"], exact_default=True),
        )
        _tie_lm_head(state, config["text"], "language_model.")
    else:
        config, preprocess = _decoder_config(cfg, max_context), {}
        vocab = config["vocab_size"]
        _tie_lm_head(state, config, "")
    tok = root / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(f"{root} has no tokenizer.json; save the tokenizer with a fast (Rust) tokenizer")
    tokenizer_json = tok.read_text()
    _check_vocab(tok, tokenizer_json, vocab)
    return HFSource(family, config, state, tokenizer_json, preprocess, tuple(files))


def _tie_lm_head(state: dict[str, torch.Tensor], lm: dict[str, Any], prefix: str) -> None:
    """HF saves tied weights once: give the LM head its copy of the token embeddings."""
    if lm["tie_word_embeddings"] and f"{prefix}lm_head.weight" not in state:
        embed = "model.decoder.embed_tokens.weight" if lm["style"] == "opt" else "model.embed_tokens.weight"
        if prefix + embed in state:
            state[f"{prefix}lm_head.weight"] = state[prefix + embed]


def _check_vocab(path: Path, tokenizer_json: str, vocab_size: int) -> None:
    """Every id the tokenizer can emit must index the text embedding table (else export hits an IndexError)."""
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True).values()
    except Exception as exc:  # tokenizers raises bare Exception for malformed JSON
        raise ConfigError(f"{path} is not a readable tokenizer: {exc}") from exc
    top = max(ids, default=-1)
    if top >= vocab_size:
        raise ConfigError(f"{path} emits token ids up to {top}, but the model's vocab_size is {vocab_size}")
