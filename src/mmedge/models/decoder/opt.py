"""OPT: LayerNorm, learned positions (offset 2), ReLU/GELU MLP; names as HF `OPTForCausalLM`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmedge.errors import UnsupportedError
from mmedge.models.blocks import activation
from mmedge.models.decoder.base import CachedAttention, CachedDecoderLM, DecoderConfig, Past, Rope


class OPTLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.pre_norm = cfg.do_layer_norm_before
        self.self_attn = CachedAttention(cfg, "out_proj")
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.hidden, cfg.ffn_dim, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.hidden, bias=cfg.bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.act = activation(cfg.act)

    def forward(
        self, x: torch.Tensor, past: Past, bias: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, ...]:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        h, k, v = self.self_attn(h, past, bias, rope)
        x = x + h
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x, k, v


class _OPTDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.embed_positions = nn.Embedding(cfg.max_positions + 2, cfg.hidden)  # HF OPT's offset of 2
        if cfg.embed_dim != cfg.hidden:
            self.project_in = nn.Linear(cfg.embed_dim, cfg.hidden, bias=False)
            self.project_out = nn.Linear(cfg.hidden, cfg.embed_dim, bias=False)
        self.final_layer_norm = (
            nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps) if cfg.do_layer_norm_before else None
        )
        self.layers = nn.ModuleList(OPTLayer(cfg) for _ in range(cfg.layers))


class _OPTModel(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.decoder = _OPTDecoder(cfg)


class OPTForCausalLM(CachedDecoderLM):
    variant = "opt"
    hf_model_types = ("opt",)
    hf_embed_weight = "model.decoder.embed_tokens.weight"
    hf_token_defaults = (2, 2, 1)

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.model = _OPTModel(cfg)
        self._finish_init()

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.decoder.layers

    def positions(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, Rope]:
        dec = self.model.decoder
        if hasattr(dec, "project_in"):
            x = dec.project_in(x)
        return x + dec.embed_positions(position_ids + 2), None

    def final(self, x: torch.Tensor) -> torch.Tensor:
        dec = self.model.decoder
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if hasattr(dec, "project_out"):
            x = dec.project_out(x)
        return x

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
        if not cfg.get("layer_norm_elementwise_affine", True):
            raise UnsupportedError("OPT with layer_norm_elementwise_affine=false is not supported")
        if cfg.get("_remove_final_layer_norm", False):
            raise UnsupportedError("OPT with _remove_final_layer_norm is not supported")
        proj = cfg.get("word_embed_proj_dim", common["hidden"])
        return {
            **common,
            "variant": cls.variant,
            "ffn_dim": cfg.get("ffn_dim", 3072),
            "act": cfg.get("activation_function", "relu"),
            "word_embed_proj_dim": 0 if proj == common["hidden"] else proj,
            "bias": cfg.get("enable_bias", True),
            "do_layer_norm_before": cfg.get("do_layer_norm_before", True),
            "norm_eps": 1e-5,
        }
