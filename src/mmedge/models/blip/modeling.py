"""BLIP: a ViT with, per variant, retrieval heads, a caption decoder or a VQA encoder-decoder.

- `itm`: HF `BlipForImageTextRetrieval` (`vision_model.*`, `text_encoder.*`, `vision_proj`,
  `text_proj`, `itm_head`): ITC embeddings and the ITM head;
- `caption`: HF `BlipForConditionalGeneration` (`vision_model.*`, `text_decoder.*`): a text decoder
  cross-attending to the image's features;
- `vqa`: HF `BlipForQuestionAnswering` (`vision_model.*`, `text_encoder.*`, `text_decoder.*`): the
  question encoded with cross-attention to the image, an answer decoder cross-attending to the
  question's states.

HF checkpoints load by name. The ViT is BLIP-2's (the same module and names); the text encoder is
the shared fusion encoder (`models.fusion`), the decoder `blip.decoder.BlipTextDecoder` over it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from mmedge.errors import ConfigError
from mmedge.models.blip.decoder import BlipTextDecoder
from mmedge.models.blip2.modeling import Blip2VisionConfig, vision_tower
from mmedge.models.configs import from_dict
from mmedge.models.fusion import FusionConfig, FusionEncoder
from mmedge.runtime.sections import CLIP_MEAN, CLIP_STD

# BLIP's ViT-B/16 at 384 px: the vision defaults (Blip2VisionConfig's are BLIP-2's EVA ViT-g).
VIT_B16_384 = {
    "image_size": 384,
    "patch_size": 16,
    "width": 768,
    "layers": 12,
    "heads": 12,
    "mlp_dim": 3072,
    "eps": 1e-5,
}
VARIANTS = ("itm", "caption", "vqa")


@dataclass(frozen=True)
class BlipConfig:
    vision: Blip2VisionConfig
    text: FusionConfig
    embed_dim: int = 256  # HF's image_text_hidden_size: the ITC space
    logit_scale_init: float = 2.6592  # ln(1/0.07): zero-shot temperature (no learned one in the ITM model)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    variant: str = "itm"  # VARIANTS
    # The decoders' (caption, vqa): self-attention cache slots and HF's special ids. Generation
    # starts from bos ([DEC]) and ends at sep ([SEP]), as HF's generate sets them.
    max_context: int = 64
    bos_token_id: int = 30522
    sep_token_id: int = 102

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"blip variant {self.variant!r} is not one of {VARIANTS}")
        if self.text.encoder_hidden != self.vision.width:
            raise ConfigError(
                f"text.encoder_hidden {self.text.encoder_hidden} != vision width {self.vision.width}"
            )
        if self.variant == "itm":
            return
        if not 0 < self.max_context <= self.text.max_positions:
            raise ConfigError(
                f"blip max_context {self.max_context} must be in [1, text.max_positions={self.text.max_positions}]"
            )
        for name in ("bos_token_id", "sep_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise ConfigError(f"blip {name} {getattr(self, name)} is outside the text vocabulary")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlipConfig:
        if not isinstance(d, dict):
            raise ConfigError("blip config must be an object")
        d = dict(d)
        parts = {
            "vision": from_dict(
                Blip2VisionConfig, {**VIT_B16_384, **d.pop("vision", {})}, "blip config 'vision'"
            ),
            "text": FusionConfig.from_dict(d.pop("text", {})),
        }
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return from_dict(cls, {**d, **parts}, "blip config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ItmModelConfig(Protocol):
    """What an ITC + ITM model reads of its config: a ViT and a fusion encoder (BLIP's, ALBEF's)."""

    @property
    def vision(self) -> Blip2VisionConfig: ...
    @property
    def text(self) -> FusionConfig: ...
    @property
    def embed_dim(self) -> int: ...


class Blip(nn.Module):
    """ITC projections of a ViT and a fusion encoder, and the ITM head over the fused [CLS] state:
    HF `BlipForImageTextRetrieval`, and the base of ALBEF's model (`models/albef`)."""

    def __init__(self, cfg: ItmModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = vision_tower(cfg.vision)
        self.text_encoder = FusionEncoder(cfg.text)
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text.hidden, 2)

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unnormalised ITC embeddings (B, D), every token's features (B, P+1, C) for the ITM)."""
        features = self.vision_model.hidden_states(pixel_values)
        return self.vision_proj(features[:, 0]), features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised ITC embeddings of texts, (B, D), from the [CLS] state of the text mode (the
        layers below the first fusion layer; BLIP's fusion encoder without cross-attention)."""
        return self.text_proj(self.text_encoder.text(input_ids, attention_mask)[:, 0])

    def itm_logits(
        self, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(no match, match) logits of image-text pairs, (B, 2), from the [CLS] state after every
        layer; softmax[:, 1] is the match probability."""
        return self.itm_head(self.text_encoder.fuse(input_ids, attention_mask, image_features)[:, 0])


class BlipCaptioner(nn.Module):
    """HF `BlipForConditionalGeneration`: the ViT and a text decoder cross-attending to its features."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = vision_tower(cfg.vision)
        self.text_decoder = BlipTextDecoder(cfg.text)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every image token's features, (B, P+1, C): what the decoder cross-attends to."""
        return self.vision_model.hidden_states(pixel_values)


class BlipVQA(BlipCaptioner):
    """HF `BlipForQuestionAnswering`: the question encoder (cross-attending to the image) feeds the
    answer decoder's cross-attention."""

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.text_encoder = FusionEncoder(cfg.text)

    def encode_question(
        self, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Every question token's state, (B, N, hidden), grounded in the image."""
        return self.text_encoder.fuse(input_ids, attention_mask, image_features)


def build(cfg: BlipConfig) -> nn.Module:
    """The variant's module."""
    return {"itm": Blip, "caption": BlipCaptioner, "vqa": BlipVQA}[cfg.variant](cfg)
