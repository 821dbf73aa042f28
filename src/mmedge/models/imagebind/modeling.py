"""ImageBind: one encoder per modality (stem, pre-LN transformer trunk, head), all into one space.

Per modality, as the official `ImageBindModel` (facebookresearch/ImageBind) composes it:

- stem: vision repeats the image as two frames and applies a Conv3d of kernel (2, p, p) (PadIm2Video);
  audio a Conv2d of kernel 16, stride 10 over the (1, 128, 204) filterbank; depth and thermal a
  single-channel Conv2d with kernel == stride; IMU cuts (6, 2000) samples into 8-sample windows,
  each flattened channel-major to 48 values, and projects them with a Linear. The audio, depth,
  thermal and IMU stems end in a LayerNorm. A class token leads and learned positions are added
  (text: token + position embeddings, no class token);
- trunk: pre-LN blocks (nn.MultiheadAttention's packed q|k|v projection; GELU MLP of ratio 4);
  the audio, depth, thermal and IMU trunks attend to one extra learned key/value (`add_bias_kv`);
  the vision trunk starts with a LayerNorm; text attends causally;
- head: LayerNorm, the class token (text: the end-of-text token), Linear to the embedding width;
- postprocessor: L2 normalisation. The official also multiplies by a scale (text: learned; audio 20,
  depth 5, thermal 10, IMU 5; vision none); that is kept here as `log_logit_scale` (a parameter for
  text, a buffer for the fixed ones, as the official) and goes to the manifest's retrieval section,
  not into the exported embeddings (`imagebind/__init__.py`).

Module names are mmedge's (`<modality>.embeddings.*`, `.encoder.layers.<i>.*`, `.head_norm`,
`.projection`, `.log_logit_scale`); `imagebind.official` maps the official key layout onto them.
Exported methods use static shapes and reshapes (no `unfold`, which ONNX Runtime rejects).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from mmedge.models.blocks import MASK_VALUE, MLP, MergedQKVAttention, imu_windows
from mmedge.models.imagebind.config import (
    BIAS_KV,
    MAX_LOGIT_SCALE,
    AudioConfig,
    ImageBindConfig,
    IMUConfig,
    PatchConfig,
    TextConfig,
    VisionConfig,
)
from mmedge.runtime.imu import IMU_CHANNELS

STEM_EPS = 1e-5  # the stems' LayerNorms (nn.LayerNorm's default in the official code)
VIDEO_FRAMES = 2  # PadIm2Video(ntimes=2) ahead of a Conv3d of temporal kernel 2: one time step

# Official path name of each modality in mmedge's manifest (`runtime.sections.PATH_SOURCES`).
PATHS = {
    "vision": "image",
    "text": "text",
    "audio": "audio",
    "depth": "depth",
    "thermal": "thermal",
    "imu": "imu",
}


class Attention(MergedQKVAttention):
    """Self-attention over one packed q|k|v projection (`qkv` = the official `in_proj_*`, `projection`
    = `out_proj`); with `bias_kv`, one learned key and value (`bias_k`, `bias_v`, (1, 1, C), already
    projected) join every sequence's keys and values, as nn.MultiheadAttention's `add_bias_kv`."""

    def __init__(self, width: int, heads: int, bias_kv: bool):
        super().__init__(width, heads)
        self.bias_k: nn.Parameter | None = None
        self.bias_v: nn.Parameter | None = None
        if bias_kv:
            self.bias_k = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, width)))
            self.bias_v = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, width)))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.bias_k is None or self.bias_v is None:
            return super().forward(x, bias)  # the pattern ORT builds fuse (builds.ort_mha)
        b, n, c = x.shape  # (B, N, C)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, N, C)
        k = torch.cat([k, self.bias_k.expand(b, 1, c)], dim=1)  # (B, N+1, C)
        v = torch.cat([v, self.bias_v.expand(b, 1, c)], dim=1)
        if bias is not None:
            bias = F.pad(bias, (0, 1))  # the learned key is never masked
        h, d = self.heads, self.head_dim
        q = q.reshape(b, n, h, d).transpose(1, 2)  # (B, H, N, D)
        k = k.reshape(b, n + 1, h, d).transpose(1, 2)  # (B, H, N+1, D)
        v = v.reshape(b, n + 1, h, d).transpose(1, 2)
        scores = torch.matmul(q * self.scale, k.transpose(-1, -2))  # (B, H, N, N+1)
        if bias is not None:
            scores = scores + bias
        out = torch.matmul(scores.softmax(dim=-1), v)  # (B, H, N, D)
        return self.projection(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """The official BlockWithMasking at inference: x + attn(norm_1(x)), then x + mlp(norm_2(x))."""

    def __init__(self, width: int, heads: int, bias_kv: bool, eps: float):
        super().__init__()
        self.self_attn = Attention(width, heads, bias_kv)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, 4 * width, "gelu")
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class Trunk(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, bias_kv: bool, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(Block(width, heads, bias_kv, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, bias)
        return x


def patchify(x: torch.Tensor, weight: torch.Tensor, grid: int) -> torch.Tensor:
    """A Conv2d of kernel == stride and no bias as reshapes and one MatMul, (B, grid*grid, C_out)
    in the Conv's row-major patch order (as `flatten(2).transpose(1, 2)` of its output)."""
    c_out, c_in, p, _ = weight.shape
    x = x.reshape(-1, c_in, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, grid * grid, c_in * p * p)
    return x @ weight.reshape(c_out, -1).t()


class _Tokens(nn.Module):
    """Class token and learned positions, in the official shapes (1, 1, C) and (1, N + 1, C)."""

    def __init__(self, width: int, patches: int):
        super().__init__()
        scale = width**-0.5  # the official OpenCLIP-style init
        self.class_embedding = nn.Parameter(torch.randn(1, 1, width) * scale)
        self.position_embedding = nn.Parameter(torch.randn(1, patches + 1, width) * scale)

    def add(self, patches: torch.Tensor) -> torch.Tensor:
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding  # (B, N+1, C)


class VisionEmbeddings(_Tokens):
    def __init__(self, cfg: VisionConfig):
        self.grid = cfg.image_size // cfg.patch_size
        super().__init__(cfg.width, self.grid**2)
        p = cfg.patch_size
        self.patch_embedding = nn.Conv3d(
            3, cfg.width, (VIDEO_FRAMES, p, p), stride=(VIDEO_FRAMES, p, p), bias=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Both frames are the image, so the Conv3d is a Conv2d with the two temporal slices summed.
        weight = self.patch_embedding.weight.sum(dim=2)  # (C, 3, p, p)
        return self.add(patchify(pixel_values, weight, self.grid))

    def video(self, video_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 2, S, S) two frames: the Conv3d of kernel (2, p, p) and stride 2 in time, one
        temporal step, as a Conv2d per frame with that frame's slice of the kernel, summed."""
        w = self.patch_embedding.weight  # (C, 3, 2, p, p)
        first = patchify(video_values[:, :, 0], w[:, :, 0], self.grid)
        return self.add(first + patchify(video_values[:, :, 1], w[:, :, 1], self.grid))


class AudioEmbeddings(_Tokens):
    def __init__(self, cfg: AudioConfig):
        rows, cols = cfg.grid
        super().__init__(cfg.width, rows * cols)
        self.stride = cfg.stride
        self.patch_embedding = nn.Conv2d(1, cfg.width, cfg.kernel_size, stride=cfg.stride, bias=False)
        self.patch_norm = nn.LayerNorm(cfg.width, eps=STEM_EPS)

    def forward(self, audio_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(audio_values).flatten(2).transpose(1, 2)  # (B, P, C): patches overlap
        return self.add(self.patch_norm(x))


class PatchEmbeddings(_Tokens):
    def __init__(self, cfg: PatchConfig):
        self.grid = cfg.image_size // cfg.patch_size
        super().__init__(cfg.width, self.grid**2)
        self.patch_embedding = nn.Conv2d(1, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.patch_norm = nn.LayerNorm(cfg.width, eps=STEM_EPS)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.add(self.patch_norm(patchify(values, self.patch_embedding.weight, self.grid)))


class IMUEmbeddings(_Tokens):
    def __init__(self, cfg: IMUConfig):
        super().__init__(cfg.width, cfg.samples // cfg.window)
        self.window = cfg.window
        self.patch_embedding = nn.Linear(IMU_CHANNELS * cfg.window, cfg.width, bias=False)
        self.patch_norm = nn.LayerNorm(cfg.width, eps=STEM_EPS)
        with torch.no_grad():  # the official IMU positions start at std 0.01
            self.position_embedding.normal_(0, 0.01)

    def forward(self, imu_values: torch.Tensor) -> torch.Tensor:
        return self.add(self.patch_norm(self.patch_embedding(imu_windows(imu_values, self.window))))


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.randn(1, cfg.context_length, cfg.width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding[:, : input_ids.shape[1]]


class Encoder(nn.Module):
    """One modality: embeddings, (pre-norm), trunk, head norm and projection, log scale."""

    def __init__(self, modality: str, cfg, embed_dim: int, scale: float, eps: float):
        super().__init__()
        self.embeddings = _EMBEDDINGS[modality](cfg)
        self.pre_layernorm = nn.LayerNorm(cfg.width, eps=eps) if modality == "vision" else None
        self.encoder = Trunk(cfg.width, cfg.layers, cfg.heads, modality in BIAS_KV, eps)
        self.head_norm = nn.LayerNorm(cfg.width, eps=eps)
        self.projection = nn.Linear(cfg.width, embed_dim, bias=False)
        log_scale = torch.tensor(math.log(scale))
        if modality == "text":  # learned, as the official; fixed elsewhere (a buffer, saved too)
            self.log_logit_scale = nn.Parameter(log_scale)
        elif modality != "vision":
            self.register_buffer("log_logit_scale", log_scale)
        for m in self.encoder.modules():  # the official trunk init ("jax": xavier-uniform Linears)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def logit_scale(self) -> float:
        """The postprocessor's scale, as the official applies it (exp, clipped at 100)."""
        return float(self.log_logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))

    def features(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Every token's features after the trunk, (B, N, C)."""
        if self.pre_layernorm is not None:
            x = self.pre_layernorm(x)
        return self.encoder(x, bias)

    def head(self, selected: torch.Tensor) -> torch.Tensor:
        """The selected token's features -> the normalised embedding, (B, D)."""
        return F.normalize(self.projection(self.head_norm(selected)), dim=-1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.embeddings(values))[:, 0])


class TextEncoder(Encoder):
    def __init__(self, cfg: TextConfig, embed_dim: int, eps: float):
        super().__init__("text", cfg, embed_dim, cfg.logit_scale_init, eps)
        self.eos_token_id = cfg.eos_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n = input_ids.shape[1]
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=input_ids.device), diagonal=1)
        # Padding follows the EOS, so the padding mask changes nothing at the EOS (causal already
        # hides later keys); it keeps rows past the EOS finite whatever the pad ids are.
        blocked = causal[None, None] | (attention_mask[:, None, None, :] == 0)  # (B, 1, N, N)
        x = self.features(self.embeddings(input_ids), blocked.to(torch.float32) * MASK_VALUE)
        ids = input_ids.to(torch.int32)  # ArgMax over int32 (ORT and TensorRT have it)
        idx = (
            ids.argmax(dim=-1)
            if self.eos_token_id is None
            else (ids == self.eos_token_id).to(torch.int32).argmax(-1)
        )
        # gather (not advanced indexing) exports to one GatherElements node.
        return self.head(
            x.gather(1, idx.to(torch.int64)[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)
        )


_EMBEDDINGS: dict[str, type[nn.Module]] = {
    "vision": VisionEmbeddings,
    "text": TextEmbeddings,
    "audio": AudioEmbeddings,
    "depth": PatchEmbeddings,
    "thermal": PatchEmbeddings,
    "imu": IMUEmbeddings,
}


class ImageBind(nn.Module):
    """The present modalities' encoders as attributes named as the official modalities."""

    def __init__(self, cfg: ImageBindConfig):
        super().__init__()
        self.cfg = cfg
        for m in cfg.present:
            sub = getattr(cfg, m)
            if m == "text":
                setattr(self, m, TextEncoder(sub, cfg.embed_dim, cfg.eps))
            else:
                setattr(self, m, Encoder(m, sub, cfg.embed_dim, getattr(sub, "logit_scale", 1.0), cfg.eps))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, D) unit-length embeddings."""
        return self.vision(pixel_values)

    def encode_video(self, video_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 2, S, S) two normalised frames -> (B, D), in the image embeddings' space."""
        v = self.vision
        return v.head(v.features(v.embeddings.video(video_values))[:, 0])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) token ids (right-padded, EOS included) -> (B, D) unit-length embeddings."""
        return self.text(input_ids, attention_mask)

    def encode_audio(self, audio_values: torch.Tensor) -> torch.Tensor:
        """(B, 1, mel_bins, frames) normalised log-mel filterbank clips -> (B, D)."""
        return self.audio(audio_values)

    def encode_depth(self, depth_values: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) normalised disparity -> (B, D)."""
        return self.depth(depth_values)

    def encode_thermal(self, thermal_values: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) normalised thermal images -> (B, D)."""
        return self.thermal(thermal_values)

    def encode_imu(self, imu_values: torch.Tensor) -> torch.Tensor:
        """(B, 6, samples) accelerometer and gyroscope samples -> (B, D)."""
        return self.imu(imu_values)

    def logit_scales(self) -> dict[str, float]:
        """Per manifest path, the scale the official postprocessor multiplies the normalised
        embedding by (vision has none)."""
        return {PATHS[m]: getattr(self, m).logit_scale() for m in self.cfg.present if m != "vision"}
