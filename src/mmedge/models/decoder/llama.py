"""Llama: RMSNorm, rotary positions, SwiGLU, grouped-query attention; names as HF `LlamaForCausalLM`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mmedge.errors import UnsupportedError
from mmedge.models.blocks import activation
from mmedge.models.decoder.base import CachedAttention, CachedDecoderLM, DecoderConfig, Past, Rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.hidden, bias=False)
        self.act = activation(cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate and up joined into one matmul (one weight in the export), as q/k/v in CachedAttention
        ffn = self.up_proj.out_features  # a Python int: constant split sizes in the export
        gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).split(
            [ffn, ffn], dim=-1
        )
        return self.down_proj(self.act(gate) * up)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, out_bias: bool | None):
        super().__init__()
        self.self_attn = CachedAttention(cfg, "o_proj", out_bias)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, past: Past, bias: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, ...]:
        h, k, v = self.self_attn(self.input_layernorm(x), past, bias, rope)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class _LlamaModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, out_bias: bool | None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(LlamaLayer(cfg, out_bias) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)


class LlamaForCausalLM(CachedDecoderLM):
    variant = "llama"
    rotary = True
    hf_model_types = ("llama",)
    hf_embed_weight = "model.embed_tokens.weight"
    hf_token_defaults = (1, 2, None)
    out_bias: bool | None = None  # the output projection's bias; None: as q/k/v (`cfg.bias`)

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.model = _LlamaModel(cfg, self.out_bias)
        self._finish_init()

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def positions(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, Rope]:
        d = self.cfg.head_dim
        inv = 1.0 / self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles = position_ids.to(torch.float32)[..., None] * inv  # (B, S, D/2)
        emb = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, S, D)
        return x, (emb.cos(), emb.sin())

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
        rope_params = cfg.get("rope_parameters") or {}
        if cfg.get("rope_scaling") or rope_params.get("rope_type", "default") != "default":
            raise UnsupportedError(f"rope scaling {cfg.get('rope_scaling') or rope_params} is not supported")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise UnsupportedError(
                f"{cfg.get('model_type')} with attention_bias or mlp_bias is not supported"
            )
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        head_dim = cfg.get("head_dim") or common["hidden"] // common["heads"]
        return {
            **common,
            "variant": cls.variant,
            "head_size": 0 if head_dim * common["heads"] == common["hidden"] else head_dim,
            "ffn_dim": cfg.get("intermediate_size"),
            "act": cfg.get("hidden_act", "silu"),
            "kv_heads": cfg.get("num_key_value_heads") or 0,
            "norm_eps": cfg.get("rms_norm_eps", 1e-6),
            "rope_theta": float(theta),
            "bias": False,
            "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
        }
