"""HF BLIP directories -> the blip family's config; weights load by name (tied LM heads filled in).

`BlipForImageTextRetrieval` -> variant `itm`, `BlipForConditionalGeneration` -> `caption`,
`BlipForQuestionAnswering` -> `vqa`.
"""

from __future__ import annotations

from typing import Any

import torch

from mmedge.errors import UnsupportedError

ARCHITECTURE = "BlipForImageTextRetrieval"
VARIANT_OF = {
    ARCHITECTURE: "itm",
    "BlipForConditionalGeneration": "caption",
    "BlipForQuestionAnswering": "vqa",
}
ARCHITECTURES = tuple(VARIANT_OF)
# HF's defaults (BlipTextConfig): [DEC] starts a caption or an answer, [SEP] ends it.
DEFAULT_BOS, DEFAULT_SEP = 30522, 102
DEFAULT_MAX_CONTEXT = 64  # decoder cache slots: a prompt and a caption or answer


def blip_config(cfg: dict[str, Any], max_context: int | None = None) -> dict[str, Any]:
    """HF BlipConfig (config.json) -> BlipConfig JSON; refuses what the modules do not model."""
    archs = cfg.get("architectures") or [ARCHITECTURE]
    found = [a for a in archs if a in VARIANT_OF]
    if not found:
        raise UnsupportedError(f"BLIP {archs} is not supported: the blip family reads {list(ARCHITECTURES)}")
    variant = VARIANT_OF[found[0]]
    t, v = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    if not t.get("is_decoder", True):
        raise UnsupportedError("a BLIP text model without cross-attention (is_decoder=false) is not modelled")
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
    positions = t.get("max_position_embeddings", 512)
    out = {
        "variant": variant,
        "vision": vision,
        "text": {
            "vocab_size": t.get("vocab_size", 30524),
            "hidden": t.get("hidden_size", 768),
            "layers": t.get("num_hidden_layers", 12),
            "heads": t.get("num_attention_heads", 8),
            "intermediate": t.get("intermediate_size", 3072),
            "act": t.get("hidden_act", "gelu"),
            "eps": t.get("layer_norm_eps", 1e-12),
            "max_positions": positions,
            "encoder_hidden": vision["width"],
            "fusion_from": 0,
            "pad_token_id": t.get("pad_token_id", 0),
        },
        "embed_dim": cfg.get("image_text_hidden_size", 256),
        "logit_scale_init": cfg.get("logit_scale_init_value", 2.6592),
    }
    if variant != "itm":
        out |= {
            "max_context": min(max_context or DEFAULT_MAX_CONTEXT, positions),
            "bos_token_id": t.get("bos_token_id", DEFAULT_BOS),
            "sep_token_id": t.get("sep_token_id", DEFAULT_SEP),
        }
    return out


def blip_weights(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """HF saves the decoder's tied LM head once: its weight is the word embeddings, its bias
    `cls.predictions.bias`."""
    head = "text_decoder.cls.predictions."
    if (
        f"{head}decoder.weight" not in state
        and "text_decoder.bert.embeddings.word_embeddings.weight" in state
    ):
        state[f"{head}decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    if f"{head}decoder.bias" not in state and f"{head}bias" in state:
        state[f"{head}decoder.bias"] = state[f"{head}bias"]
    if f"{head}bias" not in state and f"{head}decoder.bias" in state:
        state[f"{head}bias"] = state[f"{head}decoder.bias"]
    return state
