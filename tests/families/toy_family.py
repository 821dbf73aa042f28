"""A toy retrieval family that lives only in the test directory: the worked example of
docs/adding-a-family.md. An image encoder that pools linear patch features, a bag-of-words text
encoder, a learned temperature; its own config, modules, components and sections."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mmedge.models.component import ComponentDecl, bound
from mmedge.models.configs import from_dict
from mmedge.models.registry import Family, Sections
from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.sections import CLIP_MEAN, CLIP_STD, PreprocessConfig, RetrievalConfig


@dataclass(frozen=True)
class ToyConfig:
    image_size: int = 32
    patch_size: int = 8
    width: int = 32
    dim: int = 16
    vocab_size: int = 256
    context_length: int = 16

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyConfig:
        return from_dict(cls, d, "toy config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Toy(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Linear(3 * cfg.patch_size**2, cfg.width)
        self.image_head = nn.Linear(cfg.width, cfg.dim)
        self.words = nn.Embedding(cfg.vocab_size, cfg.width)
        self.text_head = nn.Linear(cfg.width, cfg.dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(20.0)))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p, g = self.cfg.patch_size, self.cfg.image_size // self.cfg.patch_size
        x = pixel_values.reshape(-1, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, g * g, 3 * p * p)
        return self.image_head(torch.relu(self.patch(x)).mean(dim=1))  # (B, D)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)[..., None]  # (B, N, 1)
        bag = (self.words(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.text_head(bag)  # (B, D)


def components(cfg: ToyConfig) -> tuple[ComponentDecl, ...]:
    batch = DimRange(1, 1, 16)
    s, d = cfg.image_size, cfg.dim
    return (
        ComponentDecl(
            name="pixels_to_vector",
            role="image_encoder",
            inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, s, s)),),
            outputs=(TensorSpec("image_embeds", "float32", ("batch", d)),),
            dims={"batch": batch},
            build=bound("encode_image"),
        ),
        ComponentDecl(
            name="words_to_vector",
            role="text_encoder",
            inputs=(
                TensorSpec("input_ids", "int64", ("batch", "sequence")),
                TensorSpec("attention_mask", "int64", ("batch", "sequence")),
            ),
            outputs=(TensorSpec("text_embeds", "float32", ("batch", d)),),
            dims={"batch": batch, "sequence": DimRange(1, 8, cfg.context_length)},
            build=bound("encode_text"),
            calibration_data="texts",
            int_ranges={"input_ids": (0, cfg.vocab_size), "attention_mask": (1, 2)},
        ),
    )


def sections(cfg: ToyConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    return Sections(
        context_length=cfg.context_length,
        pad_id=0,
        retrieval=RetrievalConfig(logit_scale=math.exp(float(model.logit_scale.detach()))),
    )


TOY = Family(
    name="toy",
    task="retrieval",
    variants=("bag-of-words",),
    summary="a toy dual encoder (test-only)",
    config_from_dict=ToyConfig.from_dict,
    variant_of=lambda cfg: "bag-of-words",
    build=Toy,
    components=components,
    preprocess=lambda cfg: PreprocessConfig(cfg.image_size, CLIP_MEAN, CLIP_STD),
    sections=sections,
)
CONFIG = {"vocab_size": 0}  # the conformance config: the tiny tokenizer's vocabulary
