"""A reference ImageBind written the way the official code composes it (facebookresearch/ImageBind,
`imagebind_model.py`, `multimodal_preprocessors.py`, `transformer.py`, `helpers.py`), so that its
`state_dict()` has the official key names by construction, not by renaming mmedge's.

The modules are torch's own where the official uses them (nn.MultiheadAttention with
`add_bias_kv`, nn.Conv3d after the image repeated as two frames, `unfold` for IMU windows, an
additive -inf causal mask, the end-of-text token at argmax(ids)), and the nesting mirrors the
official one: `modality_preprocessors.<m>` (stems `rgbt_stem` / `depth_stem` / `imu_stem` with
`proj` and `norm_layer`, `cls_token`, `pos_embedding_helper.pos_embed`), `modality_trunks.<m>`
(`pre_transformer_layer` Sequential, `blocks.<i>` with `attn`, `norm_1`, `mlp.fc1/fc2`, `norm_2`),
`modality_heads.<m>` (Sequentials: LayerNorm, select, [Dropout,] Linear; text `proj`) and
`modality_postprocessors.<m>` (Normalize, LearnableLogitScaling with `log_logit_scale`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class PadIm2Video(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # an image: (B, C, 1, H, W), then repeated as two frames
            x = x.unsqueeze(2)
        return x.repeat(1, 1, 2, 1, 1) if x.shape[2] == 1 else x  # (B, C, 2, H, W); a clip as it is


class Stem(nn.Module):  # PatchEmbedGeneric
    def __init__(self, proj: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.proj = proj
        self.norm_layer = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x if self.norm_layer is None else self.norm_layer(x)


class PosHelper(nn.Module):  # SpatioTemporalPosEmbeddingHelper(learnable=True)
    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, width) * width**-0.5)


class PatchPreprocessor(nn.Module):  # RGBDTPreprocessor / AudioPreprocessor / ThermalPreprocessor
    def __init__(self, stem_name: str, stem: Stem, patches: int, width: int):
        super().__init__()
        self.stem_name = stem_name
        setattr(self, stem_name, stem)
        self.pos_embedding_helper = PosHelper(patches + 1, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        tokens = getattr(self, self.stem_name)(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embedding_helper.pos_embed, None


class IMUPreprocessor(nn.Module):
    def __init__(self, length: int, window: int, width: int, channels: int):
        super().__init__()
        self.window = window
        self.imu_stem = Stem(nn.Linear(channels * window, width, bias=False), nn.LayerNorm(width))
        self.pos_embed = nn.Parameter(torch.randn(1, length // window + 1, width) * 0.01)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)

    def forward(self, imu: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = imu.unfold(-1, self.window, self.window).permute(0, 2, 1, 3)  # (B, windows, C, window)
        x = x.reshape(x.size(0), x.size(1), -1)
        tokens = self.imu_stem.norm_layer(self.imu_stem.proj(x))
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embed, None


class TextPreprocessor(nn.Module):
    def __init__(self, vocab: int, context: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context, width) * 0.01)
        self.register_buffer("mask", torch.full((context, context), float("-inf")).triu(1))

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_embedding(text) + self.pos_embed, self.mask


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):  # BlockWithMasking
    def __init__(self, width: int, heads: int, bias_kv: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, bias=True, add_bias_kv=bias_kv)
        self.norm_1 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width)
        self.norm_2 = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # x: (L, B, D)
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):  # SimpleTransformer
    def __init__(self, width: int, layers: int, heads: int, pre_ln: bool, bias_kv: bool):
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(width, eps=1e-6) if pre_ln else nn.Identity())
        self.blocks = nn.Sequential(*(Block(width, heads, bias_kv) for _ in range(layers)))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.pre_transformer_layer(tokens).transpose(0, 1)  # "b l d -> l b d"
        for block in self.blocks:
            x = block(x, mask)
        return x.transpose(0, 1)


class SelectElement(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, ...]


class SelectEOSAndProject(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.Linear(width, out, bias=False))

    def forward(self, x: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        return self.proj(x[torch.arange(x.shape[0]), seq_len])


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, p=2)


class LearnableLogitScaling(nn.Module):
    def __init__(self, init: float, learnable: bool):
        super().__init__()
        value = torch.ones([]) * math.log(init)
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clip(self.log_logit_scale.exp(), max=100) * x


class OfficialImageBind(nn.Module):
    """The official composition for a config in the imagebind family's JSON form (the modalities'
    sizes), every modality of `cfg["modalities"]`."""

    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["embed_dim"]
        pre, trunks, heads, post = {}, {}, {}, {}
        for m in cfg["modalities"]:
            c = cfg[m]
            w = c["width"]
            if m == "vision":
                p = c["patch_size"]
                conv = nn.Conv3d(3, w, (2, p, p), stride=(2, p, p), bias=False)
                stem = Stem(nn.Sequential(PadIm2Video(), conv))
                pre[m] = PatchPreprocessor("rgbt_stem", stem, (c["image_size"] // p) ** 2, w)
            elif m == "text":
                pre[m] = TextPreprocessor(c["vocab_size"], c["context_length"], w)
            elif m == "audio":
                conv = nn.Conv2d(1, w, kernel_size=16, stride=10, bias=False)
                stem = Stem(conv, nn.LayerNorm(w))
                patches = ((128 - 16) // 10 + 1) * ((204 - 16) // 10 + 1)
                pre[m] = PatchPreprocessor("rgbt_stem", stem, patches, w)
            elif m in ("depth", "thermal"):
                p = c["patch_size"]
                stem = Stem(nn.Conv2d(1, w, kernel_size=p, stride=p, bias=False), nn.LayerNorm(w))
                name = "depth_stem" if m == "depth" else "rgbt_stem"
                pre[m] = PatchPreprocessor(name, stem, (c["image_size"] // p) ** 2, w)
            else:
                pre[m] = IMUPreprocessor(2000, 8, w, 6)
            bias_kv = m not in ("vision", "text")
            trunks[m] = Trunk(w, c["layers"], c["heads"], pre_ln=m == "vision", bias_kv=bias_kv)
            if m == "text":
                heads[m] = SelectEOSAndProject(w, d)
            elif m == "imu":
                heads[m] = nn.Sequential(
                    nn.LayerNorm(w, eps=1e-6), SelectElement(), nn.Dropout(0.5), nn.Linear(w, d, bias=False)
                )
            else:
                heads[m] = nn.Sequential(
                    nn.LayerNorm(w, eps=1e-6), SelectElement(), nn.Linear(w, d, bias=False)
                )
            scale = {"text": 1 / 0.07, "audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}
            if m == "vision":
                post[m] = Normalize()
            else:
                post[m] = nn.Sequential(Normalize(), LearnableLogitScaling(scale[m], learnable=m == "text"))
        self.modality_preprocessors = nn.ModuleDict(pre)
        self.modality_trunks = nn.ModuleDict(trunks)
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(post)

    def forward(self, modality: str, value: torch.Tensor) -> torch.Tensor:
        """The official output of one modality (normalised, then scaled)."""
        tokens, mask = self.modality_preprocessors[modality](value)
        x = self.modality_trunks[modality](tokens, mask)
        if modality == "text":
            x = self.modality_heads[modality](x, seq_len=value.argmax(dim=-1))
        else:
            x = self.modality_heads[modality](x)
        return self.modality_postprocessors[modality](x)
