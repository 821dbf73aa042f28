"""Qwen2: Llama with biases on q/k/v (none on o_proj); names as HF `Qwen2ForCausalLM`."""

from __future__ import annotations

from typing import Any

from mmedge.models.decoder.base import check_sliding_window
from mmedge.models.decoder.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    variant = "qwen2"
    hf_model_types = ("qwen2",)
    hf_token_defaults = (None, None, None)
    out_bias = False  # `cfg.bias` puts biases on q/k/v only

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
        check_sliding_window("qwen2", _sliding_window(cfg), common["max_context"])
        return {**super().from_hf(cfg, common), "bias": True}


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    """The window some layer applies, as HF's Qwen2Config derives it: none unless
    `use_sliding_window`; then the layers marked "sliding_attention" in `layer_types`, or without
    that list the layers from `max_window_layers` on."""
    window = cfg.get("sliding_window")
    if not cfg.get("use_sliding_window") or window is None:
        return None
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        slides = "sliding_attention" in layer_types
    else:
        slides = cfg.get("max_window_layers", 28) < cfg.get("num_hidden_layers", 32)
    return int(window) if slides else None
