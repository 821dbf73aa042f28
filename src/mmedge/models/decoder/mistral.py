"""Mistral: the Llama architecture with an optional sliding window; names as HF `MistralForCausalLM`."""

from __future__ import annotations

from typing import Any

from mmedge.models.decoder.base import check_sliding_window
from mmedge.models.decoder.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    variant = "mistral"
    hf_model_types = ("mistral",)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
        # every Mistral layer slides when a window is set (HF ignores layer_types here)
        check_sliding_window("mistral", cfg.get("sliding_window"), common["max_context"])
        return super().from_hf(cfg, common)
