"""Meta-Transformer: per-modality tokenizers, one frozen shared encoder, per-task heads.

Every modality's input becomes a token sequence of the encoder's width (`tokens`, (B, T, width),
T differing per modality); the shared encoder maps any such sequence to hidden states of the same
shape; a head normalises, pools and classifies. Only tokenizers and heads train: `freeze_encoder`
turns the encoder's gradients off and `encoder_sha256` fingerprints its weights, so a recipe can
show that training left them byte-identical.

Parameter names: the encoder is `blocks.Encoder` with BLIP's packed-qkv attention
(`encoder.layers.<i>.{layer_norm1, self_attn.qkv, self_attn.projection, layer_norm2, mlp.fc1,
mlp.fc2}`), onto which the official bare-`Block` layout and HF CLIP vision trunks map (`loaders`).

Where this follows the official code and where not:
- points: openpoints' `PointPatchEmbed` (feature_type 'dp', 4 layers, max reduction) as Point-MAE's
  encoder, with LayerNorm over channels where the official has BatchNorm: the same graph in training
  and inference (no running statistics, no dependence on the batch), which exports as one
  LayerNormalization per point. Positions (an MLP of the centres) are added once, before the encoder,
  as the other tokenizers do; openpoints' MetaTransformer adds them again before every block
  (`add_pos_each_block`), which a shared encoder reading every modality's tokens cannot.
- audio: `Data2Seq/Acoustic.py`'s Conv2d patch embedding, with learned positions and a CLS token
  (AST's), which the Data2Seq snippet leaves to the caller.
- IMU: windows cut with reshape/permute in the order of `x.unfold(-1, W, W)` (ONNX Runtime rejects
  the graph `unfold` exports to), each window's channels x samples flattened channel-major
  (ImageBind's IMU stem) and projected.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mmedge.models.blocks import Encoder, imu_windows
from mmedge.models.meta_transformer.config import (
    AudioConfig,
    EncoderConfig,
    ImuConfig,
    MetaTransformerConfig,
    PointsConfig,
)


class SharedEncoder(Encoder):
    """Pre-LN transformer blocks with packed qkv (timm's `Block`), optionally after CLIP's input norm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg.layers, cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.eps, merged_qkv=True)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.pre_norm else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, width) tokens of any modality -> (B, T, width) hidden states."""
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        return super().forward(x, bias)


class _ClsToken(nn.Module):
    """A learned CLS token and its position, put before a modality's tokens."""

    def __init__(self, width: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.cls_pos = nn.Parameter(torch.randn(1, 1, width) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.cls_pos).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)


class PointTokenizer(nn.Module):
    """(B, G, K, 3) neighbourhoods relative to their centres and (B, G, 3) centres -> (B, 1+G, width).

    The official 1x1 Conv2d blocks are per-point Linear layers here (the same arithmetic, MatMuls
    that weight-only and int8 quantizers handle as GEMMs); LayerNorm replaces BatchNorm."""

    def __init__(self, cfg: PointsConfig, width: int):
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.group_size = cfg.group_size
        self.first = nn.Sequential(nn.Linear(3, c1), nn.LayerNorm(c1), nn.ReLU(), nn.Linear(c1, c2))
        self.second = nn.Sequential(nn.Linear(2 * c2, c3), nn.LayerNorm(c3), nn.ReLU(), nn.Linear(c3, width))
        self.pos_embed = nn.Sequential(
            nn.Linear(3, cfg.pos_hidden), nn.GELU(), nn.Linear(cfg.pos_hidden, width)
        )
        self.cls = _ClsToken(width)

    def forward(self, point_groups: torch.Tensor, point_centers: torch.Tensor) -> torch.Tensor:
        f = self.first(point_groups)  # (B, G, K, c2)
        pooled = f.max(dim=2, keepdim=True).values.expand(-1, -1, self.group_size, -1)
        f = self.second(torch.cat([pooled, f], dim=-1)).max(dim=2).values  # (B, G, width)
        return self.cls(f + self.pos_embed(point_centers))


class AudioTokenizer(nn.Module):
    """(B, 1, mel_bins, frames) log-mel filterbank -> (B, 1 + f*t, width): overlapping Conv2d patches."""

    def __init__(self, cfg: AudioConfig, width: int):
        super().__init__()
        self.proj = nn.Conv2d(1, width, cfg.patch, stride=(cfg.fstride, cfg.tstride))
        f, t = cfg.grid
        self.pos_embed = nn.Parameter(torch.randn(1, f * t, width) * 0.02)
        self.cls = _ClsToken(width)

    def forward(self, audio_values: torch.Tensor) -> torch.Tensor:
        x = self.proj(audio_values).flatten(2).transpose(1, 2)  # (B, f*t, width), frequency-major
        return self.cls(x + self.pos_embed)


class ImuTokenizer(nn.Module):
    """(B, channels, samples) -> (B, 1 + samples/window, width)."""

    def __init__(self, cfg: ImuConfig, width: int):
        super().__init__()
        self.window = cfg.window
        self.proj = nn.Linear(cfg.channels * cfg.window, width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.samples // cfg.window, width) * 0.02)
        self.cls = _ClsToken(width)

    def forward(self, imu_values: torch.Tensor) -> torch.Tensor:
        return self.cls(self.proj(imu_windows(imu_values, self.window)) + self.pos_embed)


class TaskHead(nn.Module):
    """(B, T, width) hidden states -> (logits (B, classes), embedding (B, len(pool) * width)).

    LayerNorm (the official encoder ends without one), the pooled features concatenated (token 0 is
    the CLS token), an optional GELU hidden layer, the classifier; the embedding is the pooled
    feature, L2-normalised."""

    def __init__(self, cfg: MetaTransformerConfig, classes: int):
        super().__init__()
        width, dim = cfg.encoder.width, cfg.embed_dim
        self.pool = cfg.pool
        self.norm = nn.LayerNorm(width, eps=cfg.head_eps)
        if cfg.head_hidden:
            self.fc: nn.Module = nn.Sequential(
                nn.Linear(dim, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, classes)
            )
        else:
            self.fc = nn.Linear(dim, classes)

    def pooled(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden_states)
        parts = {
            "cls": lambda: x[:, 0],
            "max": lambda: x[:, 1:].max(dim=1).values,
            "mean": lambda: x[:, 1:].mean(dim=1),
        }
        return torch.cat([parts[p]() for p in self.pool], dim=-1)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pooled(hidden_states)
        embeds = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.fc(pooled), embeds


class MetaTransformer(nn.Module):
    """Tokenizers and heads by modality name (`tokenizers.points`, `heads.audio`, ...), one encoder."""

    def __init__(self, cfg: MetaTransformerConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.encoder.width
        self.encoder = SharedEncoder(cfg.encoder)
        makers = {"points": PointTokenizer, "audio": AudioTokenizer, "imu": ImuTokenizer}
        self.tokenizers = nn.ModuleDict(
            {m: makers[m](cfg.modality(m), width) for m in cfg.modalities}  # type: ignore[operator]
        )
        self.heads = nn.ModuleDict({m: TaskHead(cfg, cfg.modality(m).classes) for m in cfg.modalities})
        self.apply(_init_weights)

    def tokenize(self, modality: str, *inputs: torch.Tensor) -> torch.Tensor:
        return self.tokenizers[modality](*inputs)  # type: ignore[no-any-return]

    def forward(self, modality: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A modality's inputs -> (logits, embedding), the whole path in PyTorch."""
        return self.heads[modality](self.encoder(self.tokenize(modality, *inputs)))  # type: ignore[no-any-return]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def freeze_encoder(model: MetaTransformer) -> list[nn.Parameter]:
    """Turn the shared encoder's gradients off; return the parameters left to train, the ones to give
    an optimizer. (An optimizer given frozen parameters skips them only while their grad stays None;
    the encoder has no dropout and no running statistics, so train and eval mode compute the same.)"""
    model.encoder.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def encoder_sha256(model: MetaTransformer) -> str:
    """sha256 over the shared encoder's state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.encoder.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
