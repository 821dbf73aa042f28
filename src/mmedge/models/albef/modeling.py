"""ALBEF for image-text retrieval: a ViT, a BERT text encoder whose upper layers fuse, ITC
projections, a learned temperature and the ITM head.

Module names are mmedge's (those of the blip family: `vision_model.*`, `text_encoder.*`,
`vision_proj`, `text_proj`, `itm_head`) plus ALBEF's `temp`; `albef.official` maps checkpoints in
the official layout (`visual_encoder.*`, `text_encoder.bert.*`) onto them. The ViT is BLIP-2's
module (timm's pre-norm block with one fused qkv, as ALBEF's); the text encoder is the shared
fusion encoder with BERT's token-type embeddings, text-only below `fusion_from`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mmedge.errors import ConfigError
from mmedge.models.blip.modeling import Blip
from mmedge.models.blip2.modeling import Blip2VisionConfig
from mmedge.models.configs import from_dict
from mmedge.models.fusion import FusionConfig
from mmedge.runtime.sections import CLIP_MEAN, CLIP_STD

# The released ALBEF (14M / 4M pre-training, retrieval fine-tunes): ViT-B/16 at 256 px ...
VIT_B16_256 = {
    "tower": "blip2",
    "image_size": 256,
    "patch_size": 16,
    "width": 768,
    "layers": 12,
    "heads": 12,
    "mlp_dim": 3072,
    "eps": 1e-6,
}
# ... and bert-base-uncased, its upper 6 layers cross-attending (config_bert.json: fusion_layer 6).
BERT_BASE = {
    "vocab_size": 30522,
    "hidden": 768,
    "layers": 12,
    "heads": 12,
    "intermediate": 3072,
    "fusion_from": 6,
    "type_vocab_size": 2,
    "encoder_hidden": 768,
}
# ALBEF clamps its learned temperature to this range in every forward pass.
TEMP_RANGE = (0.001, 0.5)


@dataclass(frozen=True)
class AlbefConfig:
    vision: Blip2VisionConfig
    text: FusionConfig
    embed_dim: int = 256  # the ITC space
    temp: float = 0.07  # initial ITC temperature (learned; the manifest's logit scale is 1 / temp)
    mean: tuple[float, float, float] = CLIP_MEAN  # ALBEF normalises with CLIP's statistics
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        # ALBEF's own ViT is timm's ("blip2", as the official checkpoints); "clip" is mmedge's CLIP
        # tower, for models started from a trained CLIP checkpoint (`recipes.albef`, `--init`).
        if self.vision.tower not in ("blip2", "clip"):
            raise ConfigError(f"albef's vision.tower must be 'blip2' or 'clip', got {self.vision.tower!r}")
        if self.text.encoder_hidden != self.vision.width:
            raise ConfigError(
                f"text.encoder_hidden {self.text.encoder_hidden} != vision width {self.vision.width}"
            )
        if self.text.fusion_from < 1:
            raise ConfigError("albef's text encoder needs text-only layers: text.fusion_from must be >= 1")
        if not TEMP_RANGE[0] <= self.temp <= TEMP_RANGE[1]:
            raise ConfigError(f"temp must be in {list(TEMP_RANGE)}, got {self.temp}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlbefConfig:
        if not isinstance(d, dict):
            raise ConfigError("albef config must be an object")
        d = dict(d)
        parts = {
            "vision": from_dict(
                Blip2VisionConfig, {**VIT_B16_256, **d.pop("vision", {})}, "albef config 'vision'"
            ),
            "text": FusionConfig.from_dict({**BERT_BASE, **d.pop("text", {})}),
        }
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return from_dict(cls, {**d, **parts}, "albef config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Albef(Blip):
    """BLIP's ITC + ITM model (`models/blip`) with ALBEF's learned temperature; its text encoder's
    lower layers read the text alone (ITC) and its upper layers fuse (ITM)."""

    def __init__(self, cfg: AlbefConfig):
        super().__init__(cfg)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))

    def logit_scale(self) -> float:
        """1 / temp, with ALBEF's clamp: what its ITC logits are scaled by."""
        return 1.0 / float(self.temp.detach().clamp(*TEMP_RANGE))
