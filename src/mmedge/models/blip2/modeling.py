"""BLIP-2: a frozen image encoder, the Q-Former, a projector and a frozen decoder LM.

Parameter names follow Hugging Face `Blip2ForConditionalGeneration` (`vision_model.*`,
`qformer.*`, `query_tokens`, `language_projection.*`, `language_model.*`), so HF checkpoints load
by name. The image encoder is either HF's BLIP-2 ViT (`vision.tower = "blip2"`) or an mmedge CLIP
vision tower (`"clip"`, used by `blip2-tiny` with the demo's trained `clip-tiny`); the LM is any
decoder variant (`models.decoder`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mmedge.errors import ConfigError
from mmedge.models import decoder
from mmedge.models.blip2.qformer import QFormer, QFormerConfig, QFormerTextEmbeddings
from mmedge.models.blocks import Encoder, patchify_matmul
from mmedge.models.clip.modeling import VisionConfig, VisionTransformer
from mmedge.models.configs import from_dict
from mmedge.runtime.sections import CLIP_MEAN, CLIP_STD

VISION_TOWERS = ("blip2", "clip")


@dataclass(frozen=True)
class Blip2VisionConfig:
    tower: str = "blip2"
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    layers: int = 39
    heads: int = 16
    mlp_dim: int = 6144
    act: str = "gelu"
    eps: float = 1e-6
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if self.tower not in VISION_TOWERS:
            raise ConfigError(
                f"vision tower {self.tower!r} is not supported; choose from {list(VISION_TOWERS)}"
            )

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class Blip2Config:
    vision: Blip2VisionConfig
    qformer: QFormerConfig
    text: decoder.DecoderConfig
    prompt_template: str = "Question: {} Answer:"
    caption_prompt: str = ""
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize: str = "exact"  # BLIP's processor resizes both sides

    def __post_init__(self) -> None:
        if self.qformer.encoder_hidden != self.vision.width:
            raise ConfigError(
                f"qformer.encoder_hidden {self.qformer.encoder_hidden} != vision width {self.vision.width}"
            )
        if self.vision.tower == "clip" and self.vision.qkv_bias is not True:
            raise ConfigError("a clip-style vision tower always has q/k/v biases")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blip2Config:
        if not isinstance(d, dict):
            raise ConfigError("blip2 config must be an object")
        d = dict(d)
        parts = {
            "vision": from_dict(Blip2VisionConfig, d.pop("vision", {}), "blip2 config 'vision'"),
            "qformer": QFormerConfig.from_dict(d.pop("qformer", {})),
            "text": decoder.DecoderConfig.from_dict(d.pop("text", {})),
        }
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return from_dict(cls, {**d, **parts}, "blip2 config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Blip2VisionEmbeddings(nn.Module):
    def __init__(self, cfg: Blip2VisionConfig):
        super().__init__()
        self.grid, self.image_size = cfg.image_size // cfg.patch_size, cfg.image_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, cfg.width) * 0.02)
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, cfg.tokens, cfg.width) * 0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = patchify_matmul(pixel_values, self.patch_embedding, self.grid, self.image_size)
        cls = self.class_embedding.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding


class Blip2VisionModel(nn.Module):
    """HF `Blip2VisionModel`: ViT with merged qkv; the output is every token after `post_layernorm`."""

    def __init__(self, cfg: Blip2VisionConfig):
        super().__init__()
        self.embeddings = _Blip2VisionEmbeddings(cfg)
        self.encoder = Encoder(
            cfg.layers, cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.eps, merged_qkv=True
        )
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


def vision_tower(v: Blip2VisionConfig) -> nn.Module:
    """The image encoder `v.tower` names; `hidden_states(pixel_values)` gives every token (CLS first)."""
    if v.tower == "blip2":
        return Blip2VisionModel(v)
    return VisionTransformer(
        VisionConfig(
            image_size=v.image_size,
            patch_size=v.patch_size,
            width=v.width,
            layers=v.layers,
            heads=v.heads,
            mlp_dim=v.mlp_dim,
            act=v.act,
        ),
        v.eps,
    )


class Blip2(nn.Module):
    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self.cfg = cfg
        self.vision_model = vision_tower(cfg.vision)
        self.query_tokens = nn.Parameter(
            torch.randn(1, cfg.qformer.num_query_tokens, cfg.qformer.hidden) * 0.02
        )
        self.qformer = QFormer(cfg.qformer)
        if cfg.qformer.text:
            self.qformer_text = QFormerTextEmbeddings(cfg.qformer)
        self.language_projection = nn.Linear(cfg.qformer.hidden, cfg.text.embed_dim)
        self.language_model = decoder.build_decoder(cfg.text)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model.hidden_states(pixel_values)

    def query_outputs(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.qformer(self.query_tokens.expand(image_embeds.shape[0], -1, -1), image_embeds)

    def image_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """LM input embeddings of an image, (B, Q, E)."""
        return self.language_projection(self.query_outputs(self.image_features(pixel_values)))
