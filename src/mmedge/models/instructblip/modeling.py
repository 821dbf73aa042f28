"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction.

The instruction's tokens (the Q-Former's own BERT tokenizer) get word + position embeddings, join
the learned queries after them for self-attention and the shared LayerNorm, and run through the
text feed-forward; only the queries cross-attend to the image, and only the query positions come
out. The blip2 family's modules already model all of it (`QFormerConfig.text`), so parameter names
are blip2's; HF's `qformer.embeddings.*` is renamed on import (`hf.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from mmedge.errors import ConfigError
from mmedge.models.blip2.modeling import Blip2, Blip2Config

# Added to the attention scores of padded instruction tokens: exp() of it is 0 in float32, and it
# stays small enough for quantized graphs to keep their ranges.
MASK_BIAS = -1e4


@dataclass(frozen=True)
class InstructBlipConfig(Blip2Config):
    prompt_template: str = "{}"  # the raw instruction, as HF's processor encodes it
    caption_prompt: str = "A short image description:"  # the captioning instruction of InstructBLIP's paper

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstructBlipConfig:
        """Blip2Config's parsing; the Q-Former reads text unless a config says otherwise (refused)."""
        if not isinstance(d, dict):
            raise ConfigError("instructblip config must be an object")
        qformer = d.get("qformer", {})
        with_text = {**d, "qformer": {"text": True, **qformer}} if isinstance(qformer, dict) else d
        return cast(InstructBlipConfig, super().from_dict(with_text))  # parsed as `cls`

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.qformer.text:
            raise ConfigError("an InstructBLIP Q-Former reads the instruction: set qformer.text to true")


class InstructBlip(Blip2):
    def instructed_query_outputs(
        self,
        image_embeds: torch.Tensor,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, Q, H): the query positions after reading the image and the instruction (B, T)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        # Keys' bias: 0 for every query (never padded), MASK_BIAS for padded instruction tokens.
        text_bias = (1.0 - qformer_attention_mask.to(image_embeds.dtype)) * MASK_BIAS
        bias = F.pad(text_bias, (queries.shape[1], 0))[:, None, None, :]
        out = self.qformer(queries, image_embeds, self.qformer_text(qformer_input_ids), bias)
        return out[:, : queries.shape[1]]
