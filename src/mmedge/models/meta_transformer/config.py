"""The meta-transformer family's config: one shared encoder, and per modality its tokenizer geometry
and its classification head.

Defaults are the released base encoder (Meta-Transformer-B16: width 768, 12 layers, 12 heads, MLP
ratio 4, erf GELU, LayerNorm eps 1e-5, as the README's timm `Block`s) and the official tokenizers'
geometry: points as openpoints' `PointPatchEmbed` in `cfgs/modelnet40ply2048/metatransformer.yaml`
(32-point kNN groups, channels 128/256/512, a 3 -> 128 -> width position MLP, ModelNet40's 40
classes), audio as `Data2Seq/Acoustic.py` (a 16 x 16 Conv2d at strides 10 over a 128-bin log-mel
filterbank of 204 frames, ImageBind's clip geometry). The IMU tokenizer has no official counterpart
(Data2Seq's time series tokenizer reads one channel): windows of `window` samples of all channels,
each flattened channel-major and projected (ImageBind's IMU stem, without `unfold`).

A modality set to null in the JSON form is absent: no tokenizer, no head, no path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mmedge.errors import ConfigError
from mmedge.models.blocks import activation
from mmedge.models.configs import from_dict
from mmedge.runtime.sections import MAX_CLASSES, MAX_LABEL_CHARS

MODALITIES = ("points", "audio", "imu")  # each is a runtime path of the same name
POOLS = ("cls", "max", "mean")  # what a head may pool: the CLS token, max or mean over the others


def _positive(where: str, **values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ConfigError(f"{where}: {name} must be >= 1, got {v}")


def _labels(where: str, classes: int, labels: tuple[str, ...]) -> None:
    if not 1 <= classes <= MAX_CLASSES:
        raise ConfigError(f"{where}: classes must be in [1, {MAX_CLASSES}], got {classes}")
    if labels and (
        len(labels) != classes
        or not all(isinstance(x, str) and x.strip() and len(x) <= MAX_LABEL_CHARS for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise ConfigError(
            f"{where}: labels must be empty or {classes} distinct non-empty strings (at most "
            f"{MAX_LABEL_CHARS} characters each), got {list(labels)}"
        )


@dataclass(frozen=True)
class EncoderConfig:
    """The shared encoder: pre-LN blocks with one packed qkv projection (timm's `Block`).

    `pre_norm`: a LayerNorm before the first block, as a CLIP vision trunk has (`pre_layrnorm`); the
    official encoder has none. An encoder taken from a CLIP checkpoint needs it (`loaders.from_clip`)."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    eps: float = 1e-5
    pre_norm: bool = False

    def __post_init__(self) -> None:
        _positive("meta-transformer encoder", width=self.width, layers=self.layers, heads=self.heads)
        if self.width % self.heads:
            raise ConfigError(
                f"meta-transformer encoder: width {self.width} is not a multiple of heads {self.heads}"
            )
        if not self.mlp_ratio > 0 or int(self.width * self.mlp_ratio) < 1:
            raise ConfigError(f"meta-transformer encoder: mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0 < self.eps < 1:
            raise ConfigError(f"meta-transformer encoder: eps must be in (0, 1), got {self.eps}")
        activation(self.act)

    @property
    def mlp_dim(self) -> int:
        """The MLP's hidden width, as timm computes it: int(width * mlp_ratio)."""
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class PointsConfig:
    """Point clouds as `groups` (G) kNN neighbourhoods of `group_size` (K) points, each relative to
    its centre (the runtime's farthest point sampling + kNN grouping, `runtime.points`).

    Tokenizer: a mini-PointNet per group (Point-MAE's encoder, openpoints' `PointPatchEmbed`):
    3 -> channels[0] -> channels[1] per point, max over the group, that global feature concatenated
    to every point's, -> channels[2] -> width, max again: one token per group; plus a position MLP of
    the centre (3 -> pos_hidden -> width) and a CLS token. LayerNorm stands where the official has
    BatchNorm (see `modeling.PointTokenizer`)."""

    groups: int = 256
    group_size: int = 32
    channels: tuple[int, int, int] = (128, 256, 512)
    pos_hidden: int = 128
    classes: int = 40
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = "meta-transformer points"
        _positive(where, groups=self.groups, group_size=self.group_size, pos_hidden=self.pos_hidden)
        if len(self.channels) != 3 or not all(isinstance(c, int) and c >= 1 for c in self.channels):
            raise ConfigError(f"{where}: channels must be 3 positive ints, got {list(self.channels)}")
        _labels(where, self.classes, self.labels)

    @property
    def tokens(self) -> int:
        return 1 + self.groups


@dataclass(frozen=True)
class AudioConfig:
    """A (1, mel_bins, frames) log-mel filterbank cut into `patch` x `patch` patches at strides
    (fstride, tstride) by one Conv2d, plus learned positions and a CLS token. A recording is cut
    into `clips` clips of `clip_seconds` (the runtime's audio path; their logits are averaged)."""

    mel_bins: int = 128
    frames: int = 204
    patch: int = 16
    fstride: int = 10
    tstride: int = 10
    classes: int = 35
    labels: tuple[str, ...] = ()
    clips: int = 3
    clip_seconds: float = 2.0

    def __post_init__(self) -> None:
        where = "meta-transformer audio"
        _positive(where, patch=self.patch, fstride=self.fstride, tstride=self.tstride)
        if self.mel_bins < self.patch or self.frames < self.patch:
            raise ConfigError(
                f"{where}: the {self.mel_bins} x {self.frames} filterbank is smaller than one {self.patch}-patch"
            )
        _labels(where, self.classes, self.labels)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along frequency and time."""
        return (self.mel_bins - self.patch) // self.fstride + 1, (
            self.frames - self.patch
        ) // self.tstride + 1

    @property
    def tokens(self) -> int:
        f, t = self.grid
        return 1 + f * t


@dataclass(frozen=True)
class ImuConfig:
    """(channels, samples) IMU traces cut into samples / window windows; each window's
    channels x window values, channel-major, projected to the width; learned positions, a CLS token."""

    channels: int = 6
    samples: int = 2000
    window: int = 40
    classes: int = 4
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = "meta-transformer imu"
        _positive(where, channels=self.channels, samples=self.samples, window=self.window)
        if self.samples % self.window:
            raise ConfigError(f"{where}: samples {self.samples} is not a multiple of window {self.window}")
        _labels(where, self.classes, self.labels)

    @property
    def tokens(self) -> int:
        return 1 + self.samples // self.window


ModalityConfig = PointsConfig | AudioConfig | ImuConfig
_MODALITY_CLASSES: dict[str, type[Any]] = {"points": PointsConfig, "audio": AudioConfig, "imu": ImuConfig}


@dataclass(frozen=True)
class MetaTransformerConfig:
    """The shared encoder, the modalities present (None: absent) and the heads' settings.

    Heads: a LayerNorm (eps `head_eps`: the official point model's final norm, 1e-6; the released
    encoder ends without one), the `pool` features concatenated (the official point head pools
    cls, max and mean), an optional hidden layer (`head_hidden`, GELU; 0: none) and the classifier.
    """

    encoder: EncoderConfig = EncoderConfig()
    points: PointsConfig | None = PointsConfig()
    audio: AudioConfig | None = AudioConfig()
    imu: ImuConfig | None = ImuConfig()
    pool: tuple[str, ...] = ("cls", "max", "mean")
    head_hidden: int = 0
    head_eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ConfigError("meta-transformer: at least one of points, audio, imu must be present")
        if not self.pool or len(set(self.pool)) != len(self.pool) or not set(self.pool) <= set(POOLS):
            raise ConfigError(
                f"meta-transformer: pool must be distinct names of {list(POOLS)}, got {list(self.pool)}"
            )
        if not 0 < self.head_eps < 1:
            raise ConfigError(f"meta-transformer: head_eps must be in (0, 1), got {self.head_eps}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities present, in `MODALITIES` order."""
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)

    def modality(self, name: str) -> ModalityConfig:
        cfg = getattr(self, name, None) if name in MODALITIES else None
        if cfg is None:
            raise ConfigError(
                f"meta-transformer: modality {name!r} is not present; present: {list(self.modalities)}"
            )
        return cfg  # type: ignore[no-any-return]

    @property
    def embed_dim(self) -> int:
        """Width of the pooled feature a head normalises into its embedding."""
        return len(self.pool) * self.encoder.width

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetaTransformerConfig:
        """The JSON form of presets and checkpoints; unknown keys and wrong types are ConfigErrors."""
        if not isinstance(d, dict):
            raise ConfigError(f"meta-transformer config: expected an object, got {type(d).__name__}")
        d = dict(d)
        parts: dict[str, Any] = {
            "encoder": from_dict(EncoderConfig, d.pop("encoder", {}), "meta-transformer 'encoder'")
        }
        for name, klass in _MODALITY_CLASSES.items():
            raw = d.pop(name, {})
            if raw is None:
                parts[name] = None
                continue
            if not isinstance(raw, dict):
                raise ConfigError(
                    f"meta-transformer {name!r}: expected an object or null, got {type(raw).__name__}"
                )
            raw = dict(raw)
            for key in ("channels", "labels") if name == "points" else ("labels",):
                if key in raw:
                    raw[key] = _tuple(raw[key], f"meta-transformer {name}.{key}")
            parts[name] = from_dict(klass, raw, f"meta-transformer {name!r}")
        if "pool" in d:
            d["pool"] = _tuple(d["pool"], "meta-transformer pool")
        return from_dict(cls, {**d, **parts}, "meta-transformer config")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in MODALITIES:  # asdict keeps tuples; JSON writes them as lists
            if out[name] is not None:
                out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in out[name].items()}
        out["pool"] = list(self.pool)
        return out


def _tuple(value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    return tuple(value)
