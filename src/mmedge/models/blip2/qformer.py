"""The BLIP-2 Q-Former, with Hugging Face `Blip2QFormerModel` parameter names.

Learned query tokens and (optionally: stage-1 training, InstructBLIP's instruction) text tokens
share self-attention;
only the queries cross-attend to the image features, every `cross_attention_frequency` layers,
and queries and text have separate feed-forward weights (`*_query` vs plain). Which positions
may attend to which is an additive bias the caller builds (BLIP-2's ITC / ITM / ITG masks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from mmedge.errors import ConfigError
from mmedge.models.blocks import activation
from mmedge.models.configs import from_dict


@dataclass(frozen=True)
class QFormerConfig:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    cross_attention_frequency: int = 2
    encoder_hidden: int = 1408  # width of the image features it reads
    num_query_tokens: int = 32
    act: str = "gelu"
    eps: float = 1e-12
    text: bool = False  # text embeddings + text feed-forward (stage-1 ITC / ITM / ITG, InstructBLIP)
    vocab_size: int = 30522
    max_text_positions: int = 512
    pad_token_id: int = 0  # of the Q-Former's own tokenizer

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ConfigError(f"qformer hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.cross_attention_frequency < 1 or self.num_query_tokens < 1:
            raise ConfigError("qformer cross_attention_frequency and num_query_tokens must be >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QFormerConfig:
        return from_dict(cls, d, "qformer config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BertDims(Protocol):
    """The sizes BERT-style blocks read (QFormerConfig, fusion.FusionConfig)."""

    hidden: int
    heads: int
    intermediate: int
    act: str
    eps: float


class MultiHeadAttention(nn.Module):
    """BERT's attention heads (`query`/`key`/`value`): self-attention, or cross-attention to `kv`
    of width `kv_width`; `bias` is an additive mask over the keys."""

    def __init__(self, cfg: BertDims, kv_width: int):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(kv_width, cfg.hidden)
        self.value = nn.Linear(kv_width, cfg.hidden)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        m = kv.shape[1]
        q = self.query(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.key(kv).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        v = self.value(kv).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-1, -2)
        if bias is not None:
            scores = scores + bias
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)


class AddNorm(nn.Module):
    """dense -> add input -> LayerNorm (BERT's SelfOutput / Output)."""

    def __init__(self, d_in: int, cfg: BertDims):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + x)


class _Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, kv_width)
        self.output = AddNorm(cfg.hidden, cfg)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.attention(x, kv, bias), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: BertDims):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)
        self.act = activation(cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = _Attention(cfg, cfg.hidden)
        if index % cfg.cross_attention_frequency == 0:
            self.crossattention = _Attention(cfg, cfg.encoder_hidden)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AddNorm(cfg.intermediate, cfg)
        if cfg.text:
            self.intermediate = Intermediate(cfg)
            self.output = AddNorm(cfg.intermediate, cfg)

    def forward(
        self, x: torch.Tensor, image: torch.Tensor, queries: int, bias: torch.Tensor | None, text: bool
    ) -> torch.Tensor:
        x = self.attention(x, x, bias)
        q = x[:, :queries]
        if hasattr(self, "crossattention"):
            q = self.crossattention(q, image)
        q = self.output_query(self.intermediate_query(q), q)
        if not text:
            return q
        t = x[:, queries:]
        return torch.cat([q, self.output(self.intermediate(t), t)], dim=1)


class _Encoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.layers))


class QFormer(nn.Module):
    """`forward(query_embeds, image_embeds, text_embeds=None, bias=None)` -> hidden states of queries (+ text)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.encoder = _Encoder(cfg)

    def forward(
        self,
        query_embeds: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = query_embeds if text_embeds is None else torch.cat([query_embeds, text_embeds], dim=1)
        x = self.layernorm(x)
        for layer in self.encoder.layer:
            x = layer(x, image_embeds, query_embeds.shape[1], bias, text_embeds is not None)
        return x


class QFormerTextEmbeddings(nn.Module):
    """BERT-style word + learned position embeddings of the Q-Former's text input (stage 1)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_text_positions, cfg.hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids) + self.position_embeddings.weight[: input_ids.shape[1]]
