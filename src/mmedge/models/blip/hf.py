"""HF `BlipForImageTextRetrieval` directories -> the blip family's config (weights load by name)."""

from __future__ import annotations

from typing import Any

from mmedge.errors import UnsupportedError

ARCHITECTURE = "BlipForImageTextRetrieval"


def blip_config(cfg: dict[str, Any], max_context: int | None = None) -> dict[str, Any]:
    """HF BlipConfig (config.json) -> BlipConfig JSON; refuses what the modules do not model."""
    archs = cfg.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in archs:
        raise UnsupportedError(
            f"BLIP {archs} is not supported: the blip family reads {ARCHITECTURE} (ITC + ITM); "
            "captioning and VQA checkpoints are not modelled"
        )
    t, v = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    if not t.get("is_decoder", True):
        raise UnsupportedError("a BLIP text encoder without cross-attention (is_decoder=false) has no ITM")
    vision = {  # BLIP's ViT is BLIP-2's module; HF's defaults are ViT-B/16 at 384 px
        "tower": "blip2",
        "image_size": v.get("image_size", 384),
        "patch_size": v.get("patch_size", 16),
        "width": v.get("hidden_size", 768),
        "layers": v.get("num_hidden_layers", 12),
        "heads": v.get("num_attention_heads", 12),
        "mlp_dim": v.get("intermediate_size", 3072),
        "act": v.get("hidden_act", "gelu"),
        "eps": v.get("layer_norm_eps", 1e-5),
    }
    return {
        "vision": vision,
        "text": {
            "vocab_size": t.get("vocab_size", 30524),
            "hidden": t.get("hidden_size", 768),
            "layers": t.get("num_hidden_layers", 12),
            "heads": t.get("num_attention_heads", 8),
            "intermediate": t.get("intermediate_size", 3072),
            "act": t.get("hidden_act", "gelu"),
            "eps": t.get("layer_norm_eps", 1e-12),
            "max_positions": t.get("max_position_embeddings", 512),
            "encoder_hidden": vision["width"],
            "fusion_from": 0,
            "pad_token_id": t.get("pad_token_id", 0),
        },
        "embed_dim": cfg.get("image_text_hidden_size", 256),
        "logit_scale_init": cfg.get("logit_scale_init_value", 2.6592),
    }
