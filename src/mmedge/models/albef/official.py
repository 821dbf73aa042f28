"""Checkpoints in the official ALBEF layout (salesforce/ALBEF) -> the albef family's state dict.

The released files hold the whole training model: `visual_encoder.*` (a timm ViT),
`text_encoder.bert.*` (pre-training, beside the MLM head `text_encoder.cls.*`) or `text_encoder.*`
(retrieval fine-tunes), `vision_proj`, `text_proj`, `itm_head`, `temp`, and what only training
reads: the momentum copies (`visual_encoder_m`, `vision_proj_m`, `text_encoder_m`, `text_proj_m`),
the feature queues (`image_queue`, `text_queue`, `idx_queue`, `queue_ptr`) and BERT's
`position_ids` buffer. Those are dropped; any other name is refused, so a file of another model
is not half-loaded.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mmedge.models.checkpoint import renamed_state

_QUEUES = frozenset({"image_queue", "text_queue", "idx_queue", "queue_ptr"})
_MOMENTUM = re.compile(r"[A-Za-z_]+_m\.")  # visual_encoder_m., text_proj_m., ...
_TRAINING_ONLY = re.compile(r"text_encoder\.(bert\.)?(cls\.|embeddings\.position_ids$)")

# timm ViT names -> mmedge's (BLIP-2's ViT module), after the `visual_encoder.` prefix
_VIT = (
    (re.compile(r"cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embedding.\1"),
    (re.compile(r"blocks\.(\d+)\.norm1\.(weight|bias)$"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"blocks\.(\d+)\.norm2\.(weight|bias)$"), r"encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), r"encoder.layers.\1.self_attn.qkv.\2"),
    (re.compile(r"blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"norm\.(weight|bias)$"), r"post_layernorm.\1"),
)
_HEADS = re.compile(r"(vision_proj|text_proj|itm_head)\.(weight|bias)$|temp$")


def is_training_only(name: str) -> bool:
    """Momentum copies, queues, the MLM head and buffers: what inference never reads."""
    return name in _QUEUES or bool(_MOMENTUM.match(name)) or bool(_TRAINING_ONLY.match(name))


def _rename(name: str) -> str | None:
    if name.startswith("visual_encoder."):
        rest = name[len("visual_encoder.") :]
        for pattern, repl in _VIT:
            if pattern.fullmatch(rest):
                return "vision_model." + pattern.sub(repl, rest)
        return None
    if name.startswith("text_encoder."):
        rest = name[len("text_encoder.") :].removeprefix("bert.")
        # BERT's names are the fusion encoder's (models.fusion)
        return "text_encoder." + rest if rest.startswith(("embeddings.", "encoder.layer.")) else None
    return name if _HEADS.fullmatch(name) else None


def from_official(state: dict[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """An official ALBEF state dict (or the training checkpoint {"model": state dict, ...} that
    ALBEF's scripts save) -> the albef family's names; training-only entries are dropped and
    unknown names refused (`ConfigError`)."""
    if isinstance(state.get("model"), dict):
        state = state["model"]
    return renamed_state(
        state,
        _rename,
        is_training_only,
        source,
        "ALBEF's layout (visual_encoder.*, text_encoder[.bert].*, vision_proj, text_proj, itm_head, "
        "temp, momentum copies, queues)",
    )
