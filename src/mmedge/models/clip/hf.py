"""HF `CLIPModel` directories -> the clip family's config (weights load by name as saved)."""

from __future__ import annotations

from typing import Any

from mmedge.errors import UnsupportedError


def clip_config(cfg: dict[str, Any], max_context: int | None = None) -> dict[str, Any]:
    """HF CLIPConfig (config.json) -> CLIPConfig JSON; refuses what the modules do not model."""
    t, v = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    eps_t, eps_v = t.get("layer_norm_eps", 1e-5), v.get("layer_norm_eps", 1e-5)
    if eps_t != eps_v:
        raise UnsupportedError(
            f"different layer_norm_eps for text ({eps_t}) and vision ({eps_v}) is not supported"
        )
    return {
        "vision": clip_vision_config(v),
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


def clip_vision_config(v: dict[str, Any]) -> dict[str, Any]:
    """HF CLIPVisionConfig -> the clip family's VisionConfig JSON (LLaVA's tower reads it too)."""
    return {
        "image_size": v.get("image_size", 224),
        "patch_size": v.get("patch_size", 32),
        "width": v.get("hidden_size", 768),
        "layers": v.get("num_hidden_layers", 12),
        "heads": v.get("num_attention_heads", 12),
        "mlp_dim": v.get("intermediate_size", 3072),
        "act": v.get("hidden_act", "quick_gelu"),
    }
