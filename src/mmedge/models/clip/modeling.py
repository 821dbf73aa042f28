"""The CLIP family: ViT image tower, causal text transformer, linear projections (ITC).

Module and parameter names equal Hugging Face's `CLIPModel`, so an HF state dict loads
with `load_state_dict` as it is (see `clip.hf`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mmedge.errors import ConfigError
from mmedge.models.blocks import MASK_VALUE, Encoder, activation, patchify_matmul
from mmedge.models.configs import from_dict


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        activation(self.act)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        activation(self.act)


@dataclass(frozen=True)
class CLIPConfig:
    vision: VisionConfig
    text: TextConfig
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5
    logit_scale_init: float = 2.6592  # ln(1/0.07), as in the CLIP paper

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        """Build from the JSON form used by presets and checkpoints; unknown keys are errors."""
        d = dict(d)
        vision = from_dict(VisionConfig, d.pop("vision", {}), "clip config 'vision'")
        text = from_dict(TextConfig, d.pop("text", {}), "clip config 'text'")
        return from_dict(cls, {**d, "vision": vision, "text": text}, "clip config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * cfg.width**-0.5)
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        n = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(n, cfg.width)
        self.grid, self.image_size = cfg.image_size // cfg.patch_size, cfg.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = patchify_matmul(pixel_values, self.patch_embedding, self.grid, self.image_size)  # (B, P, C)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, P+1, C)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, eps: float):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=eps)  # HF's spelling, kept for weight names
        self.encoder = Encoder(cfg.layers, cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, eps)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=eps)

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))

    def hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every token's features after the last layer and `post_layernorm`, (B, P+1, C): what
        BLIP-2's Q-Former reads (as HF's Blip2VisionModel's last_hidden_state)."""
        return self.post_layernorm(self._encode(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled (class token) features, (B, C); the norm runs on that token only."""
        return self.post_layernorm(self._encode(pixel_values)[:, 0])


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, eps: float):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg.layers, cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, eps)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=eps)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every token's features after the final norm, causal attention only, (B, N, C): what
        Stable Diffusion's U-Net cross-attends to (transformers' `CLIPTextModel` last_hidden_state
        without an attention mask)."""
        bias = _future(input_ids).to(torch.float32) * MASK_VALUE  # (1, 1, N, N)
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids), bias))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Features at the end-of-text token, (B, C)."""
        blocked = _future(input_ids) | (attention_mask[:, None, None, :] == 0)  # (B, 1, N, N)
        bias = blocked.to(torch.float32) * MASK_VALUE
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids), bias))
        # HF pools at argmax(input_ids) for legacy configs whose eos id is 2, else at the first eos.
        if self.cfg.eos_token_id == 2:
            idx = input_ids.to(torch.int32).argmax(dim=-1)
        else:
            idx = (input_ids == self.cfg.eos_token_id).to(torch.int32).argmax(dim=-1)
        # gather (not advanced indexing) exports to one GatherElements node.
        return x.gather(1, idx.to(torch.int64)[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)


def _future(input_ids: torch.Tensor) -> torch.Tensor:
    """(1, 1, N, N) bool: True where a position would attend to a later one (causal attention)."""
    n = input_ids.shape[1]
    return torch.triu(torch.ones(n, n, dtype=torch.bool, device=input_ids.device), diagonal=1)[None, None]


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision, cfg.layer_norm_eps)
        self.text_model = TextTransformer(cfg.text, cfg.layer_norm_eps)
        self.visual_projection = nn.Linear(cfg.vision.width, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.width, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.apply(_init_weights)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings, (B, D)."""
        return self.visual_projection(self.vision_model(pixel_values))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings, (B, D)."""
        return self.text_projection(self.text_model(input_ids, attention_mask))


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes (MAE-style), (grid*grid + 1, width); row 0 is the class token."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    codes = torch.cat(parts, dim=1)  # (P, 4 * quarter)
    codes = nn.functional.pad(codes, (0, width - codes.shape[1]))
    return torch.cat([torch.zeros(1, width), codes])


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, VisionEmbeddings):
        # Start from explicit 2-D positions: layout ("top left", "center") is what captions name,
        # and a near-zero random init leaves the model blind to it for most of a short training run.
        with torch.no_grad():
            m.position_embedding.weight.copy_(sincos_2d(m.grid, m.position_embedding.weight.shape[1]))
        return
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
