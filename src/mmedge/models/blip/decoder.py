"""BLIP's text decoder (HF `BlipTextLMHeadModel`): a BERT decoder that cross-attends to an encoder.

Parameter names are HF's (`bert.embeddings.*`, `bert.encoder.layer.<i>.attention.*`,
`.crossattention.*`, `cls.predictions.*`): the module is the shared fusion encoder
(`models.fusion.FusionEncoder`, every layer with cross-attention) plus BERT's LM head. It is exported
as three graphs (docs/generation.md, "Cross-attention"):

- `embed_tokens`: word embeddings only. BERT adds position embeddings *before* its embedding
  LayerNorm, so positions and that LayerNorm run inside the step, as OPT's learned positions do;
- `cross_kv(encoder_hidden_states)`: every layer's cross-attention keys and values, computed once
  per image (captioning) or question (VQA) and bound by the runtime for the whole generation;
- `step(...)`: one cached decoder step: self-attention over a fixed-size cache plus the new tokens
  (the contract of `decoder.base.CachedDecoderLM.step`), cross-attention over the precomputed keys
  and values, the LM head on the last K positions.

The cross keys/values may have one row while the step has several (beam search): the attention
matmuls broadcast over the batch, so beams share one buffer and it is never reordered.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmedge.models.blocks import MASK_VALUE, activation
from mmedge.models.decoder.base import packed_attention
from mmedge.models.fusion import FusionConfig, FusionEncoder, FusionLayer


class _Transform(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.transform_act_fn = activation(cfg.act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class _Predictions(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.transform = _Transform(cfg)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # HF ties decoder.bias to this one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class _LMHead(nn.Module):
    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.predictions = _Predictions(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    b, n, width = x.shape
    return x.view(b, n, heads, width // heads).transpose(1, 2)


class BlipTextDecoder(nn.Module):
    """Token embeddings -> next-token logits, with a self-attention cache and precomputed cross K/V."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.bert = FusionEncoder(cfg)
        self.cls = _LMHead(cfg)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def cross_kv(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each layer's cross-attention (key, value), (B, H, N, D), flat in layer order.

        All layers' key and value projections run as one matmul (their weights concatenated at
        export, the same products): ORT's weight-only kernel quantizes the N encoder rows once
        instead of once per projection and runs one wide GEMM; on BLIP-base (577 rows, 24
        projections) its time fell by a third and the component's by a quarter, split included."""
        selves = [layer.crossattention.self for layer in self.bert.encoder.layer]
        weight = torch.cat([w for a in selves for w in (a.key.weight, a.value.weight)])
        bias = torch.cat([b for a in selves for b in (a.key.bias, a.value.bias)])
        # split on the last axis, then each part's head transpose: two copies of each part; a 5-D
        # transpose then unbind exports as Split + Squeeze and copies three times
        kv = F.linear(encoder_hidden_states, weight, bias).split(self.heads * self.head_dim, dim=-1)
        return tuple(_heads(part, self.heads) for part in kv)

    def _self_attention(
        self,
        layer: FusionLayer,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # one q|k|v projection (q pre-scaled) and the decoders' attention: the ORT build then
        # rewrites it into GroupQueryAttention over an in-place cache (`builds.ort_decoder`)
        a = layer.attention.self
        scale = 1.0 / math.sqrt(self.head_dim)
        weight = torch.cat([a.query.weight * scale, a.key.weight, a.value.weight])
        bias_qkv = torch.cat([a.query.bias * scale, a.key.bias, a.value.bias])
        out, k, v = packed_attention(
            F.linear(x, weight, bias_qkv), past, bias, None, self.heads, self.heads, self.head_dim
        )
        return layer.attention.output(out, x), k, v

    def _cross_attention(
        self,
        layer: FusionLayer,
        x: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # every encoder position is attended (HF passes an all-ones encoder mask; the runtime's
        # question states are unpadded); `bias` masks a padded batch's positions in training.
        # key/value may have one row for B query rows: the matmuls broadcast
        a = layer.crossattention.self
        q = _heads(a.query(x) * (1.0 / math.sqrt(self.head_dim)), self.heads)
        scores = q @ key.transpose(-1, -2)
        out = torch.softmax(scores if bias is None else scores + bias, dim=-1) @ value
        b, _, s, _ = out.shape
        return layer.crossattention.output(out.transpose(1, 2).reshape(b, s, -1), x)

    def step(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cross: list[tuple[torch.Tensor, torch.Tensor]],
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        logits_to_keep: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits (B, K, V) of the last K positions and each layer's new self-attention (key, value).

        `attention_mask` (B, T + S) covers the T cache slots then the S new tokens, as in
        `decoder.base.CachedDecoderLM.step`; `cross` holds each layer's cross (key, value)."""
        s = inputs_embeds.shape[1]
        t = attention_mask.shape[1] - s
        mask = attention_mask.to(inputs_embeds.dtype)
        causal = torch.triu(torch.full((s, s), MASK_VALUE, dtype=inputs_embeds.dtype), diagonal=1)
        bias = causal + (1.0 - mask[:, None, None, t:]) * MASK_VALUE  # (B, 1, S, S)
        if past is not None:
            past_bias = (1.0 - mask[:, None, None, :t]) * MASK_VALUE  # (B, 1, 1, T)
            bias = torch.cat([past_bias.expand(-1, -1, s, -1), bias], dim=-1)
        emb = self.bert.embeddings
        x = emb.LayerNorm(inputs_embeds + emb.position_embeddings(position_ids))
        new_kv = []
        for i, layer in enumerate(self.bert.encoder.layer):
            x, k, v = self._self_attention(layer, x, past[i] if past is not None else None, bias)
            x = self._cross_attention(layer, x, *cross[i], bias=cross_bias)
            x = layer.output(layer.intermediate(x), x)
            new_kv.append((k, v))
        if logits_to_keep is not None:
            x = x[:, s - logits_to_keep[0] :]
        return self.cls(x), new_kv

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of whole sequences without any cache: cross keys/values computed from
        `encoder_hidden_states` in this call (the reference the cached runtime is checked against,
        and training's forward). `encoder_mask` (B, N), 0 at padding, for padded encoder states."""
        kv = self.cross_kv(encoder_hidden_states)
        cross = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]
        b, n = input_ids.shape
        positions = torch.arange(n).expand(b, n)
        bias = None
        if encoder_mask is not None:
            bias = (encoder_mask[:, None, None, :] == 0).to(encoder_hidden_states.dtype) * MASK_VALUE
        embeds = self.embed_tokens(input_ids)
        return self.step(embeds, torch.ones_like(input_ids), positions, cross, cross_bias=bias)[0]


class DecoderStep(nn.Module):
    """The exported step: flat inputs, self-attention cache then cross keys/values, each key then
    value per layer (HF / ORT GenAI naming)."""

    def __init__(self, decoder: BlipTextDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        logits_to_keep: torch.Tensor,
        *caches: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        n = len(caches) // 2  # past, then cross: 2 * layers each
        past = [(caches[2 * i], caches[2 * i + 1]) for i in range(n // 2)]
        cross = [(caches[n + 2 * i], caches[n + 2 * i + 1]) for i in range(n // 2)]
        logits, new_kv = self.decoder.step(
            inputs_embeds, attention_mask, position_ids, cross, past, logits_to_keep
        )
        return (logits, *(t for kv in new_kv for t in kv))


def cross_names(layers: int) -> list[str]:
    """The cross keys/values' tensor names: key then value per layer."""
    return [f"cross_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
