"""HF `Blip2ForConditionalGeneration` directories -> the blip2 family's config and weights."""

from __future__ import annotations

from typing import Any

import torch

from mmedge.errors import UnsupportedError
from mmedge.models import decoder


def blip2_config(cfg: dict[str, Any], max_context: int | None = None) -> dict[str, Any]:
    """HF Blip2Config -> Blip2Config JSON; refuses what the modules do not model."""
    q, t = cfg.get("qformer_config") or {}, cfg.get("text_config") or {}
    if t.get("model_type", "opt") != "opt":
        raise UnsupportedError(
            f"BLIP-2 with a {t.get('model_type')!r} language model is not supported; OPT is"
        )
    if q.get("use_qformer_text_input"):
        raise UnsupportedError(
            "a Q-Former with text input (InstructBLIP-style) is not supported by the blip2 family"
        )
    return {
        **vision_qformer_config(cfg),
        "text": decoder.hf_decoder_config({"model_type": "opt", **t}, max_context),
    }


def vision_qformer_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The "vision" and "qformer" parts of a BLIP-2-style HF config (InstructBLIP's too)."""
    v, q = cfg.get("vision_config") or {}, cfg.get("qformer_config") or {}
    return {
        "vision": vision_config(v),
        "qformer": qformer_config(q, v.get("hidden_size", 1408), cfg.get("num_query_tokens", 32)),
    }


def vision_config(v: dict[str, Any]) -> dict[str, Any]:
    """HF Blip2VisionConfig -> Blip2VisionConfig JSON (HF's defaults are EVA ViT-g's)."""
    return {
        "tower": "blip2",
        "image_size": v.get("image_size", 224),
        "patch_size": v.get("patch_size", 14),
        "width": v.get("hidden_size", 1408),
        "layers": v.get("num_hidden_layers", 39),
        "heads": v.get("num_attention_heads", 16),
        "mlp_dim": v.get("intermediate_size", 6144),
        "act": v.get("hidden_act", "gelu"),
        "eps": v.get("layer_norm_eps", 1e-6),
        "qkv_bias": v.get("qkv_bias", True),
    }


def qformer_config(q: dict[str, Any], encoder_hidden: int, num_query_tokens: int) -> dict[str, Any]:
    """HF Blip2QFormerConfig -> QFormerConfig JSON, reading image features `encoder_hidden` wide."""
    return {
        "hidden": q.get("hidden_size", 768),
        "layers": q.get("num_hidden_layers", 12),
        "heads": q.get("num_attention_heads", 12),
        "intermediate": q.get("intermediate_size", 3072),
        "cross_attention_frequency": q.get("cross_attention_frequency", 2),
        "encoder_hidden": encoder_hidden,
        "num_query_tokens": num_query_tokens,
        "act": q.get("hidden_act", "gelu"),
        "eps": q.get("layer_norm_eps", 1e-12),
    }


def blip2_weights(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """HF saves a tied LM head once; give the model its copy."""
    decoder.tie_lm_head(state, cfg.text, "language_model.")
    return state
