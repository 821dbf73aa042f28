"""MiniGPT-4: BLIP-2's frozen image encoder (and, in v1, its Q-Former), one trained Linear
`llama_proj`, and a frozen Llama-family LM.

Parameter names follow the HF BLIP-2 modules for the image side (`vision_model.*`, `qformer.*`,
`query_tokens`, as `models.blip2` reads them), the official checkpoint for the projection
(`llama_proj.*`) and the decoder variant for `language_model.*`.

- "vicuna" (MiniGPT-4 v1): the Q-Former's query outputs -> `llama_proj`.
- "llama2": no Q-Former; the ViT's patch tokens (CLS dropped) with every four consecutive
  tokens concatenated into one, four times as wide -> `llama_proj`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mmedge.errors import ConfigError
from mmedge.models import decoder
from mmedge.models.blip2.modeling import Blip2VisionConfig, vision_tower
from mmedge.models.blip2.qformer import QFormer, QFormerConfig
from mmedge.models.configs import from_dict
from mmedge.runtime.sections import CLIP_MEAN, CLIP_STD

VARIANTS = ("vicuna", "llama2")
MERGE = 4  # the llama2 variant's neighbouring patch tokens per LLM position
# The LM the official releases use, when a config names none (shapes of a 7B Llama).
_DEFAULT_TEXT = {
    "variant": "llama",
    "vocab_size": 32000,
    "hidden": 4096,
    "layers": 32,
    "heads": 32,
    "ffn_dim": 11008,
    "act": "silu",
    "norm_eps": 1e-6,
    "bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class MiniGPT4Config:
    vision: Blip2VisionConfig
    text: decoder.DecoderConfig
    variant: str = "vicuna"
    qformer: QFormerConfig | None = None  # the vicuna variant's; the llama2 variant has none
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"minigpt4 variant {self.variant!r} is not one of {list(VARIANTS)}")
        if (self.qformer is not None) != (self.variant == "vicuna"):
            raise ConfigError("the minigpt4 vicuna variant has a Q-Former and the llama2 variant none")
        if self.qformer is not None and self.qformer.encoder_hidden != self.vision.width:
            raise ConfigError(
                f"qformer.encoder_hidden {self.qformer.encoder_hidden} != vision width {self.vision.width}"
            )
        if self.variant == "llama2" and self.patches % MERGE:
            raise ConfigError(
                f"the llama2 variant merges every {MERGE} patch tokens; the vision tower has {self.patches}"
            )

    @property
    def patches(self) -> int:
        return self.vision.tokens - 1

    @property
    def projection_in(self) -> int:
        """Width of what `llama_proj` reads: query outputs, or four merged patch tokens."""
        return self.qformer.hidden if self.qformer is not None else MERGE * self.vision.width

    @property
    def image_tokens(self) -> int:
        """LLM positions one image takes."""
        return self.qformer.num_query_tokens if self.qformer is not None else self.patches // MERGE

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniGPT4Config:
        if not isinstance(d, dict):
            raise ConfigError("minigpt4 config must be an object")
        d = dict(d)
        variant = d.get("variant", "vicuna")
        qformer = d.pop("qformer", {} if variant == "vicuna" else None)
        parts = {
            "vision": from_dict(Blip2VisionConfig, d.pop("vision", {}), "minigpt4 config 'vision'"),
            "text": decoder.DecoderConfig.from_dict(d.pop("text", _DEFAULT_TEXT)),
            "qformer": None if qformer is None else QFormerConfig.from_dict(qformer),
        }
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return from_dict(cls, {**d, **parts}, "minigpt4 config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MiniGPT4(nn.Module):
    def __init__(self, cfg: MiniGPT4Config):
        super().__init__()
        self.cfg = cfg
        self.vision_model = vision_tower(cfg.vision)
        if cfg.qformer is not None:
            self.query_tokens = nn.Parameter(
                torch.randn(1, cfg.qformer.num_query_tokens, cfg.qformer.hidden) * 0.02
            )
            self.qformer = QFormer(cfg.qformer)
        self.llama_proj = nn.Linear(cfg.projection_in, cfg.text.embed_dim)
        self.language_model = decoder.build_decoder(cfg.text)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model.hidden_states(pixel_values)

    def query_outputs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.qformer(self.query_tokens.expand(image_embeds.shape[0], -1, -1), image_embeds)

    def project_patches(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """llama2: patch tokens (CLS dropped), each four in raster order joined, -> `llama_proj`."""
        cfg = self.cfg
        merged = image_embeds[:, 1:].reshape(-1, cfg.image_tokens, cfg.projection_in)
        return self.llama_proj(merged)
