"""BLIP for image-text retrieval: a ViT, an image-grounded text encoder, ITC projections and the ITM head.

Parameter names follow Hugging Face `BlipForImageTextRetrieval` (`vision_model.*`, `text_encoder.*`,
`vision_proj`, `text_proj`, `itm_head`), so HF checkpoints load by name. The ViT is BLIP-2's (the
same module and names); the text encoder is the shared fusion encoder (`models.fusion`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mmedge.errors import ConfigError
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


@dataclass(frozen=True)
class BlipConfig:
    vision: Blip2VisionConfig
    text: FusionConfig
    embed_dim: int = 256  # HF's image_text_hidden_size: the ITC space
    logit_scale_init: float = 2.6592  # ln(1/0.07): zero-shot temperature (no learned one in the ITM model)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.text.encoder_hidden != self.vision.width:
            raise ConfigError(
                f"text.encoder_hidden {self.text.encoder_hidden} != vision width {self.vision.width}"
            )

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


class Blip(nn.Module):
    def __init__(self, cfg: BlipConfig):
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
        """Unnormalised ITC embeddings of texts, (B, D), from the [CLS] state of the text mode."""
        return self.text_proj(self.text_encoder.text(input_ids, attention_mask)[:, 0])

    def itm_logits(
        self, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(no match, match) logits of image-text pairs, (B, 2); softmax[:, 1] is the match probability."""
        return self.itm_head(self.text_encoder.fuse(input_ids, attention_mask, image_features)[:, 0])
