"""The causal-lm family: a decoder-only LM on its own (text generation), any decoder variant.

Components: `embed` (token_embed) and `llm` (llm_step), the cached step of `models.decoder`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmedge.models import decoder
from mmedge.models.registry import Family, HFSupport, Sections, register
from mmedge.runtime.sections import PromptConfig


def sections(cfg: decoder.DecoderConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    bos = decoder.bos_marker(tokenizer_json, cfg.bos_token_id)
    return Sections(
        context_length=cfg.max_context,
        pad_id=cfg.pad_token_id,
        llm=decoder.llm_section(cfg),
        prompt=PromptConfig(first_turn=bos + "{prompt}", turn="{prompt}", answer="{answer}"),
    )


def _weights(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    decoder.tie_lm_head(state, cfg)
    return state


FAMILY = register(
    Family(
        name="causal-lm",
        task="generation",
        variants=tuple(decoder.VARIANTS),
        summary="decoder-only LM with a KV-cached step (text generation)",
        config_from_dict=decoder.DecoderConfig.from_dict,
        variant_of=lambda cfg: cfg.variant,
        build=decoder.build_decoder,
        components=decoder.components,
        preprocess=lambda cfg: None,
        sections=sections,
        hf=HFSupport(
            model_types=decoder.hf_model_types(),
            architectures=("OPTForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
            config=decoder.hf_decoder_config,
            weights=_weights,
        ),
    )
)
