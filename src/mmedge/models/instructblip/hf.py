"""HF `InstructBlipForConditionalGeneration` directories -> the instructblip family's config and weights."""

from __future__ import annotations

from typing import Any

import torch

from mmedge.errors import UnsupportedError
from mmedge.models import decoder
from mmedge.models.blip2.hf import vision_qformer_config

# HF keeps the instruction's embeddings and the LayerNorm they share with the queries in
# `qformer.embeddings`; the blip2 modules keep them as `qformer_text` and `qformer.layernorm`.
_RENAMES = (
    ("qformer.embeddings.layernorm.", "qformer.layernorm."),
    ("qformer.embeddings.word_embeddings.", "qformer_text.word_embeddings."),
    ("qformer.embeddings.position_embeddings.", "qformer_text.position_embeddings."),
)


def instructblip_config(cfg: dict[str, Any], max_context: int | None = None) -> dict[str, Any]:
    """HF InstructBlipConfig -> InstructBlipConfig JSON; refuses what the modules do not model."""
    q, t = cfg.get("qformer_config") or {}, cfg.get("text_config") or {}
    kind = t.get("model_type", "opt")
    if kind == "t5" or t.get("is_encoder_decoder"):
        raise UnsupportedError(
            f"InstructBLIP with the encoder-decoder LM {kind!r} (Flan-T5) is not supported yet: "
            "encoder-decoder language models are pending; decoder-only OPT and Llama LMs are supported"
        )
    parts = vision_qformer_config(cfg)
    parts["qformer"].update(
        text=True,
        vocab_size=q.get("vocab_size", 30522),
        max_text_positions=q.get("max_position_embeddings", 512),
        pad_token_id=q.get("pad_token_id") or 0,
    )
    return {**parts, "text": decoder.hf_decoder_config({"model_type": "opt", **t}, max_context)}


def instructblip_weights(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Rename the Q-Former's embeddings; HF saves a tied LM head once: give the model its copy."""
    out = {}
    for key, value in state.items():
        old, new = next(((o, n) for o, n in _RENAMES if key.startswith(o)), ("", ""))
        out[new + key[len(old) :]] = value
    decoder.tie_lm_head(out, cfg.text, "language_model.")
    return out
