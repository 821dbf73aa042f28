"""LLaVA: a CLIP vision tower read at an inner layer, a projector into the LM's width, a decoder LM.

Parameter names follow Hugging Face `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration`
as saved (`vision_tower.*`, `multi_modal_projector.linear_{1,2}.*`, `image_newline`,
`language_model.*`), so HF checkpoints load by name (`llava.hf` maps the older and newer spellings).

Variants: "v1" (one Linear), "1.5" (Linear, GELU, Linear), "next" (1.5's projector over the tiles of
an any-resolution image; the tiling, unpadding and the learned `image_newline` after every row are
host work, `runtime.anyres`). Only the tower's layers up to the deepest selected one are exported:
LLaVA reads the second-to-last layer by default, so the last layer would be wasted work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mmedge.errors import ConfigError
from mmedge.models import decoder
from mmedge.models.blocks import activation
from mmedge.models.clip.modeling import VisionConfig, VisionTransformer
from mmedge.models.configs import from_dict
from mmedge.runtime.sections import CLIP_MEAN, CLIP_STD

LLAVA_VARIANTS = ("v1", "1.5", "next")
SELECT_STRATEGIES = ("default", "full")  # default: the CLS token is dropped; full: kept

# LLaVA-1.5's conversation format (HF llava-hf processors ship this template).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class LlavaVisionConfig:
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    act: str = "quick_gelu"
    eps: float = 1e-5

    def clip(self) -> VisionConfig:
        return VisionConfig(
            self.image_size, self.patch_size, self.width, self.layers, self.heads, self.mlp_dim, self.act
        )

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LlavaConfig:
    vision: LlavaVisionConfig
    text: decoder.DecoderConfig
    variant: str = "1.5"
    feature_layers: tuple[int, ...] = (-2,)  # HF hidden_states indices: 0 = embeddings, -1 = last layer
    select_strategy: str = "default"
    projector_act: str = "gelu"
    projector_bias: bool = True
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # "next": candidate (height, width) resolutions
    pad_square: bool = False  # 1.5: pad to a square in the mean colour before resizing (expand2square)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    image_token: str = "<image>"  # the placeholder the chat template writes for an image
    chat_template: str = LLAVA_CHAT_TEMPLATE
    caption_prompt: str = "Describe the image briefly."

    def __post_init__(self) -> None:
        if self.variant not in LLAVA_VARIANTS:
            raise ConfigError(
                f"llava variant {self.variant!r} is not supported; choose from {LLAVA_VARIANTS}"
            )
        if self.select_strategy not in SELECT_STRATEGIES:
            raise ConfigError(
                f"vision_feature_select_strategy {self.select_strategy!r} is not supported; "
                f"choose from {SELECT_STRATEGIES}"
            )
        n = self.vision.layers + 1  # hidden states: the embeddings, then one per layer
        if not self.feature_layers or any(not -n <= i < n for i in self.feature_layers):
            raise ConfigError(
                f"vision_feature_layer {list(self.feature_layers)} must index the tower's {n} hidden states"
            )
        if (self.variant == "next") != bool(self.grid_pinpoints):
            raise ConfigError("grid_pinpoints are set exactly when the variant is 'next'")
        if self.variant == "v1" and self.projector_act != "gelu":
            raise ConfigError("the v1 projector is one Linear; projector_act does not apply")
        activation(self.projector_act)

    @property
    def layer_indices(self) -> tuple[int, ...]:
        """The selected hidden states as non-negative indices (0 = the embeddings)."""
        n = self.vision.layers + 1
        return tuple(i % n for i in self.feature_layers)

    @property
    def image_tokens(self) -> int:
        """Tokens per tile (or image): patches, plus the CLS token under the 'full' strategy."""
        return self.vision.patches + (self.select_strategy == "full")

    @property
    def feature_width(self) -> int:
        return self.vision.width * len(self.feature_layers)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        if not isinstance(d, dict):
            raise ConfigError("llava config must be an object")
        d = dict(d)
        parts = {
            "vision": from_dict(LlavaVisionConfig, d.pop("vision", {}), "llava config 'vision'"),
            "text": decoder.DecoderConfig.from_dict(d.pop("text", {})),
        }
        for k in ("mean", "std", "feature_layers"):
            if k in d:
                d[k] = tuple(d[k])
        if "grid_pinpoints" in d:
            d["grid_pinpoints"] = tuple(tuple(p) for p in d["grid_pinpoints"])
        return from_dict(cls, {**d, **parts}, "llava config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Projector(nn.Module):
    """`multi_modal_projector`: Linear (v1) or Linear, activation, Linear (1.5, NeXT)."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        e = cfg.text.embed_dim
        self.linear_1 = nn.Linear(cfg.feature_width, e, bias=cfg.projector_bias)
        self.two = cfg.variant != "v1"
        if self.two:
            self.act = activation(cfg.projector_act)
            self.linear_2 = nn.Linear(e, e, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return self.linear_2(self.act(x)) if self.two else x


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTransformer(cfg.vision.clip(), cfg.vision.eps)
        self.multi_modal_projector = Projector(cfg)
        if cfg.variant == "next":
            self.image_newline = nn.Parameter(torch.randn(cfg.text.embed_dim) * cfg.text.embed_dim**-0.5)
        self.language_model = decoder.build_decoder(cfg.text)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The selected hidden states of the tower, (B, P or P+1, width x layers); layers past the
        deepest selected one are not run."""
        tower, wanted = self.vision_tower, self.cfg.layer_indices
        x = tower.pre_layrnorm(tower.embeddings(pixel_values))
        hidden = [x]
        for layer in tower.encoder.layers[: max(wanted)]:
            x = layer(x)
            hidden.append(x)
        start = 1 if self.cfg.select_strategy == "default" else 0
        picked = [hidden[i][:, start:] for i in wanted]
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)

    def image_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """LM input embeddings of each image (or tile), (B, T, E)."""
        return self.multi_modal_projector(self.image_features(pixel_values))
