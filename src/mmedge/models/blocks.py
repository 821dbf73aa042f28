"""Transformer building blocks shared by the families.

Parameter names follow Hugging Face's CLIP layout (`self_attn.q_proj`, `layer_norm1`,
`mlp.fc1`, ...) so HF checkpoints map onto these modules by name, without transformers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmedge.errors import ConfigError

# Large negative bias for masked attention scores: finite so that fp16 engines stay finite too.
MASK_VALUE = -3.0e4


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: nn.functional.gelu(x),
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
    "silu": nn.functional.silu,
}


def activation(name: str):
    """Look up an activation by its HF config name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(
            f"activation {name!r} is not supported; choose from {sorted(ACTIVATIONS)}"
        ) from None


class Attention(nn.Module):
    """Multi-head self-attention with an additive mask; written out so ONNX export is plain ops."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape  # (B, N, C)
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        k = self.k_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q * self.scale, k.transpose(-1, -2))  # (B, H, N, N)
        if bias is not None:
            scores = scores + bias
        out = torch.matmul(scores.softmax(dim=-1), v)  # (B, H, N, D)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MergedQKVAttention(nn.Module):
    """Self-attention with one `qkv` projection and a `projection` output (HF BLIP / BLIP-2 names)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if width % heads:
            raise ConfigError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.projection = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )  # (B, H, N, D)
        scores = torch.matmul(q * self.scale, k.transpose(-1, -2))
        if bias is not None:
            scores = scores + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.projection(out.transpose(1, 2).reshape(b, n, c))


def patchify_matmul(pixel_values: torch.Tensor, conv: nn.Conv2d, grid: int, image_size: int) -> torch.Tensor:
    """A kernel == stride patch Conv computed as reshapes and one MatMul, (B, grid*grid, C).

    The same arithmetic, but quantizers and ORT's integer kernels treat a MatMul as an ordinary
    GEMM, whereas the Conv stayed in float (~10% of ViT-B/32's int8 time). Static shapes; the
    batch is -1. Trailing pixels that do not fill a patch are dropped, as the Conv drops them.
    """
    p = conv.kernel_size[0]
    if image_size != grid * p:
        pixel_values = pixel_values[:, :, : grid * p, : grid * p]
    x = (
        pixel_values.reshape(-1, 3, grid, p, grid, p)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(-1, grid * grid, 3 * p * p)
    )
    x = x @ conv.weight.reshape(conv.out_channels, -1).t()
    return x + conv.bias if conv.bias is not None else x


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer (CLIP / ViT style); `merged_qkv` selects BLIP's attention names."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float, merged_qkv: bool = False):
        super().__init__()
        self.self_attn = MergedQKVAttention(width, heads) if merged_qkv else Attention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, act)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(
        self,
        layers: int,
        width: int,
        heads: int,
        mlp_dim: int,
        act: str,
        eps: float,
        merged_qkv: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(width, heads, mlp_dim, act, eps, merged_qkv) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, bias)
        return x


def imu_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, L) -> (B, L / window, C * window): each window's samples, channel-major (ImageBind's
    IMU stem, Meta-Transformer's IMU tokenizer). The values of the official
    `x.unfold(-1, window, window).permute(0, 2, 1, 3)` flattened per window, written with
    reshape/permute because ONNX Runtime has no kernel for the unfold export."""
    _, c, length = x.shape
    n = length // window
    return x.reshape(-1, c, n, window).permute(0, 2, 1, 3).reshape(-1, n, c * window)
