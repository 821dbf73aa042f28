"""An image-grounded text encoder (ALBEF / BLIP's fusion encoder), with Hugging Face BERT names.

A BERT-style text encoder whose layers from `fusion_from` on cross-attend to image features
after their self-attention (BLIP: every layer; ALBEF: the upper half). It runs two ways:

- `text(input_ids, attention_mask)`: the text alone, for contrastive (ITC) embeddings: the layers
  below `fusion_from` where there are any (ALBEF's text encoder), else every layer with its
  cross-attention skipped (BLIP's text mode);
- `fuse(input_ids, attention_mask, image_features)`: every layer, cross-attending to the image
  (image-text matching, ITM, reads the first token's state).

Parameter names follow HF `BlipTextModel` (`embeddings.*`, `encoder.layer.<i>.attention.self.query`,
`.crossattention.*`, `.intermediate.dense`, `.output.*`), so BLIP checkpoints load by name; the
attention, add-and-norm and feed-forward pieces are the Q-Former's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mmedge.errors import ConfigError
from mmedge.models.blip2.qformer import AddNorm, Intermediate, MultiHeadAttention
from mmedge.models.blocks import MASK_VALUE, activation
from mmedge.models.configs import from_dict


@dataclass(frozen=True)
class FusionConfig:
    vocab_size: int = 30524
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    act: str = "gelu"
    eps: float = 1e-12
    max_positions: int = 512
    encoder_hidden: int = 768  # width of the image features it reads
    fusion_from: int = 0  # first layer with cross-attention (BLIP: 0; ALBEF: layers // 2)
    pad_token_id: int = 0
    # BERT's token-type (segment) embeddings: ALBEF's BERT keeps them (type 0 is added to every
    # token), HF BLIP's text encoder has none (0).
    type_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ConfigError(f"fusion hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if not 0 <= self.fusion_from < self.layers:
            raise ConfigError(f"fusion_from must be in [0, layers={self.layers}), got {self.fusion_from}")
        activation(self.act)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionConfig:
        return from_dict(cls, d, "fusion encoder config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BertAttention(nn.Module):
    """`self` (the heads) then `output` (dense, residual, LayerNorm), as HF's BERT names them."""

    def __init__(self, cfg: FusionConfig, kv_width: int):
        super().__init__()
        self.self = MultiHeadAttention(cfg, kv_width)
        self.output = AddNorm(cfg.hidden, cfg)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(x, kv, bias), x)


class FusionLayer(nn.Module):
    def __init__(self, cfg: FusionConfig, index: int):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden)
        if index >= cfg.fusion_from:
            self.crossattention = BertAttention(cfg, cfg.encoder_hidden)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg.intermediate, cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, x, bias)
        if image is not None and hasattr(self, "crossattention"):
            x = self.crossattention(x, image)  # every image token is attended: no image mask
        return self.output(self.intermediate(x), x)


class FusionEmbeddings(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        if cfg.type_vocab_size:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:n]
        if hasattr(self, "token_type_embeddings"):  # every token is of type 0 (one segment)
            x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Layers(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.layer = nn.ModuleList(FusionLayer(cfg, i) for i in range(cfg.layers))


class FusionEncoder(nn.Module):
    """Token ids (+ image features) -> every token's hidden state, (B, N, hidden)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = FusionEmbeddings(cfg)
        self.encoder = _Layers(cfg)

    def _run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor | None, layers: int
    ) -> torch.Tensor:
        return self.run_layers(self.embeddings(input_ids), attention_mask, image, 0, layers)

    def run_layers(
        self, x: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor | None, start: int, stop: int
    ) -> torch.Tensor:
        """Hidden states through layers `start`..`stop` (training runs the fusion layers on the text
        layers' output, as ALBEF's "fusion" mode does, instead of running those layers again)."""
        # Padding is masked as keys only; the padded positions' own states are never read.
        bias = (attention_mask[:, None, None, :] == 0).to(torch.float32) * MASK_VALUE  # (B, 1, 1, N)
        for layer in self.encoder.layer[start:stop]:
            x = layer(x, bias, image)
        return x

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text alone (ITC): the layers below `fusion_from`, or all of them without cross-attention."""
        return self._run(input_ids, attention_mask, None, self.cfg.fusion_from or self.cfg.layers)

    def fuse(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """The text grounded in the image (ITM): every layer, cross-attending from `fusion_from` on."""
        return self._run(input_ids, attention_mask, image_features, self.cfg.layers)
