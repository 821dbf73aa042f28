"""Decoder LMs with an explicit KV cache: one base (`base.CachedDecoderLM`), one class per variant.

Shared by every family with a language model (causal-lm, blip2, and the LLaVA line to come). A new
variant subclasses the base (or a variant it extends, as Mistral and Qwen2 extend Llama) in its own
module and is added to `VARIANTS`.
"""

from __future__ import annotations

from typing import Any

from mmedge.errors import UnsupportedError
from mmedge.models.decoder.base import (
    CachedDecoderLM,
    DecoderConfig,
    bos_marker,
    cache_names,
    components,
    llm_section,
)
from mmedge.models.decoder.llama import LlamaForCausalLM
from mmedge.models.decoder.mistral import MistralForCausalLM
from mmedge.models.decoder.opt import OPTForCausalLM
from mmedge.models.decoder.qwen2 import Qwen2ForCausalLM

VARIANTS: dict[str, type[CachedDecoderLM]] = {
    v.variant: v for v in (OPTForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)
}
DEFAULT_MAX_CONTEXT = 256  # KV cache slots of an imported LM (capped by max_position_embeddings)

__all__ = [
    "DEFAULT_MAX_CONTEXT",
    "VARIANTS",
    "CachedDecoderLM",
    "DecoderConfig",
    "bos_marker",
    "build_decoder",
    "cache_names",
    "components",
    "hf_decoder_config",
    "hf_model_types",
    "llm_section",
    "tie_lm_head",
]


def build_decoder(cfg: DecoderConfig) -> CachedDecoderLM:
    """The variant's module for `cfg`, randomly initialised."""
    return VARIANTS[cfg.variant](cfg)


def hf_model_types() -> tuple[str, ...]:
    """Every HF `model_type` some decoder variant reads."""
    return tuple(t for v in VARIANTS.values() for t in v.hf_model_types)


def hf_decoder_config(cfg: dict[str, Any], max_context: int | None = None) -> dict[str, Any]:
    """HF config.json of a decoder LM -> DecoderConfig (JSON form); refuses what no variant models."""
    model_type = cfg.get("model_type")
    variant = next((v for v in VARIANTS.values() if model_type in v.hf_model_types), None)
    if variant is None:
        raise UnsupportedError(
            f"decoder model_type {model_type!r} is not supported; supported: {list(hf_model_types())}"
        )
    positions = cfg.get("max_position_embeddings", 2048)
    bos, eos, pad = _special_ids(cfg, variant.hf_token_defaults)
    common = {
        "vocab_size": cfg.get("vocab_size"),
        "hidden": cfg.get("hidden_size"),
        "layers": cfg.get("num_hidden_layers"),
        "heads": cfg.get("num_attention_heads"),
        "max_positions": positions,
        "max_context": min(max_context or DEFAULT_MAX_CONTEXT, positions),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    return variant.from_hf(cfg, common)


def _special_ids(cfg: dict[str, Any], defaults: tuple[int | None, ...]) -> tuple[int, int, int]:
    """(bos, eos, pad) of an HF config: a missing key takes the HF config class's default; a null
    BOS (Qwen2: the tokenizer adds none) falls back to EOS, a null pad to 0 (pads are masked)."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    bos, eos, pad = (cfg.get(k, default) for k, default in zip(keys, defaults, strict=True))
    model_type = cfg.get("model_type")
    if isinstance(eos, list):
        raise UnsupportedError(f"{model_type} eos_token_id {eos}: one end-of-sequence id is supported")
    if eos is None:
        raise UnsupportedError(f"{model_type} config.json sets no eos_token_id")
    return eos if bos is None else bos, eos, 0 if pad is None else pad


def tie_lm_head(state: dict[str, Any], cfg: DecoderConfig, prefix: str = "") -> None:
    """HF saves tied weights once: give the LM head its copy of the token embeddings."""
    embed = prefix + VARIANTS[cfg.variant].hf_embed_weight
    if cfg.tie_word_embeddings and f"{prefix}lm_head.weight" not in state and embed in state:
        state[f"{prefix}lm_head.weight"] = state[embed]
