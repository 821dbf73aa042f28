"""The imagebind family's config: one embedding width, and per modality its input geometry, trunk
sizes and the scale its postprocessor multiplies the normalised embedding by.

Defaults are the released `imagebind_huge` (facebookresearch/ImageBind, `imagebind_model.py`).
What the official code fixes rather than configures is fixed here too: the MLP ratio (4), GELU,
the stems' LayerNorm epsilon (1e-5; the trunks' is `eps`), the vision trunk's pre-norm, the
2-frame vision stem and which trunks add the learned key/value bias (audio, depth, thermal, IMU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mmedge.errors import ConfigError
from mmedge.models.configs import from_dict

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")
# Modalities whose trunk attends to one extra learned key/value (nn.MultiheadAttention's add_bias_kv).
BIAS_KV = frozenset({"audio", "depth", "thermal", "imu"})
MAX_LOGIT_SCALE = 100.0  # the official LearnableLogitScaling clips exp(log scale) here


def _check_trunk(where: str, width: int, layers: int, heads: int, drop_path: float) -> None:
    if width < 1 or layers < 1 or heads < 1 or width % heads:
        raise ConfigError(f"{where}: width {width} must be a positive multiple of heads {heads}, layers >= 1")
    if not 0.0 <= drop_path < 1.0:
        raise ConfigError(f"{where}: drop_path must be in [0, 1), got {drop_path}")


def _check_scale(where: str, scale: float) -> None:
    if not 0.0 < scale <= MAX_LOGIT_SCALE:
        raise ConfigError(f"{where}: logit_scale must be in (0, {MAX_LOGIT_SCALE:g}], got {scale}")


@dataclass(frozen=True)
class VisionConfig:
    """Images as a 2-frame video (the image repeated): a Conv3d stem of kernel (2, p, p)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    drop_path: float = 0.0  # training only; inference ignores it

    def __post_init__(self) -> None:
        _check_trunk("imagebind vision", self.width, self.layers, self.heads, self.drop_path)
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ConfigError(
                f"imagebind vision: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )


@dataclass(frozen=True)
class TextConfig:
    """Token + position embeddings, a causal trunk, the end-of-text token's features."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    layers: int = 24
    heads: int = 16
    drop_path: float = 0.0
    # None: the official selection, the position of the largest id (CLIP's BPE has its end-of-text
    # token last, so that is the EOS). An id: the first position holding it (a tokenizer whose EOS
    # is not its largest id, like mmedge's tiny ones); both agree on CLIP's vocabulary.
    eos_token_id: int | None = None
    pad_token_id: int = 0
    logit_scale_init: float = 1 / 0.07  # learnable, as the official text postprocessor's

    def __post_init__(self) -> None:
        _check_trunk("imagebind text", self.width, self.layers, self.heads, self.drop_path)
        if self.vocab_size < 1 or self.context_length < 1:
            raise ConfigError("imagebind text: vocab_size and context_length must be positive")
        eos = self.eos_token_id
        if eos is not None and (
            not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < self.vocab_size
        ):
            raise ConfigError(
                f"imagebind text: eos_token_id must be null or an id below vocab_size, got {eos!r}"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"imagebind text: pad_token_id {self.pad_token_id} is outside the vocabulary")
        _check_scale("imagebind text", self.logit_scale_init)


@dataclass(frozen=True)
class AudioConfig:
    """A (1, mel_bins, frames) log-mel filterbank clip; an overlapping Conv2d stem (stride < kernel)."""

    mel_bins: int = 128
    frames: int = 204
    kernel_size: int = 16
    stride: int = 10
    width: int = 768
    layers: int = 12
    heads: int = 12
    drop_path: float = 0.1
    logit_scale: float = 20.0  # fixed
    # How the runtime cuts a recording (the embeddings of its clips are averaged): ImageBind's three
    # evenly spaced 2 s clips; one clip for recordings no longer than a clip.
    clips: int = 3
    clip_seconds: float = 2.0

    def __post_init__(self) -> None:
        _check_trunk("imagebind audio", self.width, self.layers, self.heads, self.drop_path)
        if not 1 <= self.kernel_size <= min(self.mel_bins, self.frames) or self.stride < 1:
            raise ConfigError(
                f"imagebind audio: kernel_size {self.kernel_size} must fit a {self.mel_bins} x {self.frames} "
                "input and stride must be positive"
            )
        _check_scale("imagebind audio", self.logit_scale)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along the mel and time axes (the Conv2d's output size)."""
        return (
            (self.mel_bins - self.kernel_size) // self.stride + 1,
            (self.frames - self.kernel_size) // self.stride + 1,
        )


@dataclass(frozen=True)
class PatchConfig:
    """A single-channel image (depth as disparity, thermal): a Conv2d stem with kernel == stride."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    layers: int = 12
    heads: int = 8
    drop_path: float = 0.0
    logit_scale: float = 5.0  # fixed

    def __post_init__(self) -> None:
        _check_trunk("imagebind depth/thermal", self.width, self.layers, self.heads, self.drop_path)
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ConfigError(
                f"imagebind depth/thermal: image_size {self.image_size} is not a multiple of patch_size "
                f"{self.patch_size}"
            )
        _check_scale("imagebind depth/thermal", self.logit_scale)


@dataclass(frozen=True)
class IMUConfig:
    """(6, samples) accelerometer xyz + gyroscope xyz, cut into windows of `window` samples, each
    flattened channel-major (6 x window values) and projected by one Linear."""

    samples: int = 2000
    window: int = 8
    width: int = 512
    layers: int = 6
    heads: int = 8
    drop_path: float = 0.7
    logit_scale: float = 5.0  # fixed

    def __post_init__(self) -> None:
        _check_trunk("imagebind imu", self.width, self.layers, self.heads, self.drop_path)
        if self.window < 1 or self.samples % self.window or self.samples < self.window:
            raise ConfigError(
                f"imagebind imu: samples {self.samples} must be a positive multiple of window {self.window}"
            )
        _check_scale("imagebind imu", self.logit_scale)


_THERMAL = PatchConfig(width=768, layers=12, heads=12, logit_scale=10.0)
_PARTS: dict[str, tuple[type, Any]] = {
    "vision": (VisionConfig, VisionConfig()),
    "text": (TextConfig, TextConfig()),
    "audio": (AudioConfig, AudioConfig()),
    "depth": (PatchConfig, PatchConfig()),
    "thermal": (PatchConfig, _THERMAL),
    "imu": (IMUConfig, IMUConfig()),
}


@dataclass(frozen=True)
class ImageBindConfig:
    """Which modalities the model has and each one's settings (those absent are kept, unused)."""

    modalities: tuple[str, ...] = MODALITIES
    embed_dim: int = 1024
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    depth: PatchConfig = field(default_factory=PatchConfig)
    thermal: PatchConfig = _THERMAL
    imu: IMUConfig = field(default_factory=IMUConfig)
    # The trunks' and heads' LayerNorm epsilon: the official 1e-6; a model whose vision and text
    # come from a CLIP checkpoint takes that checkpoint's (clip-tiny: 1e-5).
    eps: float = 1e-6
    # Also export the vision encoder on 2-frame clips (the "video" path: the Conv3d stem over two
    # real frames). A second graph over the same weights, so off unless asked for.
    video: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"imagebind eps must be in (0, 1), got {self.eps}")
        mods = self.modalities
        if not isinstance(mods, (list, tuple)) or not all(isinstance(m, str) for m in mods):
            raise ConfigError(f"imagebind modalities must be a list of names, got {mods!r}")
        object.__setattr__(self, "modalities", tuple(mods))
        unknown = sorted(set(mods) - set(MODALITIES))
        if unknown or len(set(mods)) != len(mods):
            raise ConfigError(f"imagebind modalities {list(mods)}: each once, from {list(MODALITIES)}")
        # A retrieval package needs the image and text paths; the others join them in one space.
        if not {"vision", "text"} <= set(mods):
            raise ConfigError(f"imagebind modalities must include 'vision' and 'text', got {list(mods)}")
        if self.embed_dim < 1:
            raise ConfigError(f"imagebind embed_dim must be positive, got {self.embed_dim}")
        if not isinstance(self.video, bool):
            raise ConfigError(f"imagebind video must be true or false, got {self.video!r}")

    @property
    def present(self) -> tuple[str, ...]:
        """The modalities in the official order (vision, text, audio, depth, thermal, imu)."""
        return tuple(m for m in MODALITIES if m in self.modalities)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageBindConfig:
        """Build from the JSON form (presets, checkpoints); unknown keys are errors. A modality's
        object overrides its defaults (the released model's), key by key."""
        if not isinstance(d, dict):
            raise ConfigError("imagebind config must be an object")
        d = dict(d)
        parts = {}
        for name, (kind, default) in _PARTS.items():
            raw = d.pop(name, {})
            if not isinstance(raw, dict):
                raise ConfigError(f"imagebind config {name!r} must be an object")
            parts[name] = from_dict(kind, {**asdict(default), **raw}, f"imagebind config {name!r}")
        if "modalities" in d and isinstance(d["modalities"], list):
            d["modalities"] = tuple(d["modalities"])
        top = from_dict(cls, d, "imagebind config")
        return replace(top, **parts)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["modalities"] = list(self.modalities)
        return out
