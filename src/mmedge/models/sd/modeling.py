"""The stable-diffusion family: CLIP text encoder, conditional U-Net, optional VAE.

The U-Net and the VAE are diffusers' own modules (`UNet2DConditionModel`, `AutoencoderKL`), built
from their diffusers configs: diffusers is the library made for them, and its weight names are the
ones a diffusers directory holds. The text encoder is the clip family's text transformer, whose
names are transformers' `CLIPTextModel`'s. Without a VAE the U-Net works in pixel space (sd-tiny).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mmedge.errors import ConfigError, UnsupportedError, require
from mmedge.models.clip.modeling import TextConfig, TextTransformer
from mmedge.models.configs import from_dict
from mmedge.runtime.diffusion_config import DiffusionConfig
from mmedge.runtime.schedulers import SchedulerConfig

# U-Net settings that add inputs the exported graph does not take (SDXL's text_time embeddings, class
# labels, LCM's guidance embedding) or change what conditions it; refused until the runtime feeds them.
# The accepted values of each: addition_embed_type "text" pools the prompt's own hidden states into
# the timestep embedding (no new input), which is how sd-tiny conditions every resolution.
_UNET_ACCEPTED: dict[str, tuple[Any, ...]] = {
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text"),
    "num_class_embeds": (None,),
    "time_cond_proj_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
}
# StableDiffusionPipeline neither shifts latents nor normalises them per channel (SD3 / SDXL-style VAEs)
_VAE_ACCEPTED: dict[str, tuple[Any, ...]] = {
    "latents_mean": (None,),
    "latents_std": (None,),
    "shift_factor": (None,),
}
# Keys diffusers writes into every config.json that are records, not settings.
_RECORD_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def diffusers_settings(
    cls_name: str, config: dict[str, Any], accepted_values: dict[str, tuple[Any, ...]]
) -> dict[str, Any]:
    """A diffusers model config reduced to its constructor's settings; unknown keys and settings
    whose values the exported graphs do not support are errors naming them."""
    diffusers = require("diffusers", "diffusion")
    cls = getattr(diffusers, cls_name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    settings = {k: v for k, v in config.items() if k not in _RECORD_KEYS}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ConfigError(f"{cls_name} config: unknown keys {unknown}; diffusers accepts {sorted(accepted)}")
    for key, supported in accepted_values.items():
        if key in settings and settings[key] not in supported:
            raise UnsupportedError(
                f"{cls_name} config: {key}={settings[key]!r} is not supported (it needs inputs or steps the "
                f"exported graph does not have); accepted: {', '.join(map(repr, supported))}"
            )
    return settings


# Stable Diffusion 1.5's sizes: the family's defaults (what `mmedge families` and the benchmarks show).
SD15_TEXT = {"width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072, "pad_token_id": 49407}
SD15_UNET: dict[str, Any] = {"sample_size": 64, "cross_attention_dim": 768}  # diffusers' defaults otherwise
SD15_VAE: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
# SD 1.5 ships PNDM, which the runtime does not implement: DPM-Solver++ over its noise schedule.
SD15_SCHEDULER: dict[str, Any] = {
    "kind": "dpmsolver++",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


@dataclass(frozen=True)
class SDConfig:
    """A text-to-image model: `unet` and `vae` are diffusers configs (vae None: pixel space).
    A key left out takes Stable Diffusion 1.5's value (for `vae`, only when the key is absent)."""

    text: TextConfig = field(default_factory=lambda: TextConfig(**SD15_TEXT))
    unet: dict[str, Any] = field(default_factory=lambda: dict(SD15_UNET))
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER))  # SchedulerConfig JSON
    vae: dict[str, Any] | None = field(default_factory=lambda: dict(SD15_VAE))
    layer_norm_eps: float = 1e-5
    guidance: float = 7.5  # default classifier-free guidance scale
    steps: int = 25  # default inference steps
    max_batch: int = 4  # images per call; the U-Net's batch range is twice this (guidance)
    extra: dict[str, Any] = field(default_factory=dict)  # records (e.g. the source's pipeline class)

    def __post_init__(self) -> None:
        unet = diffusers_settings("UNet2DConditionModel", self.unet, _UNET_ACCEPTED)
        object.__setattr__(self, "unet", unet)
        if self.vae is not None:
            object.__setattr__(self, "vae", diffusers_settings("AutoencoderKL", self.vae, _VAE_ACCEPTED))
        cross = unet.get("cross_attention_dim", 1280)
        if cross != self.text.width:
            raise ConfigError(
                f"the U-Net's cross_attention_dim {cross} differs from the text encoder's width {self.text.width}"
            )
        if self.vae is not None and self.vae.get("latent_channels", 4) != unet.get("in_channels", 4):
            raise ConfigError(
                f"the VAE's latent_channels {self.vae.get('latent_channels', 4)} differ from the U-Net's "
                f"in_channels {unet.get('in_channels', 4)}"
            )
        if unet.get("in_channels", 4) != unet.get("out_channels", 4):
            raise UnsupportedError(
                "a U-Net whose in_channels and out_channels differ (inpainting) is not supported"
            )
        if not 1 <= self.max_batch <= 64:
            raise ConfigError(f"max_batch must be in [1, 64], got {self.max_batch}")
        self.diffusion()  # the scheduler, geometry, guidance and steps, checked as the runtime checks them

    def diffusion(self) -> DiffusionConfig:
        """The manifest's `diffusion` section of this model."""
        vae = self.vae or {}
        return DiffusionConfig(
            scheduler=SchedulerConfig.from_dict(self.scheduler),
            latent_channels=self.latent_channels,
            sample_size=self.sample_size,
            latent_multiple=self.latent_multiple,
            vae_scale_factor=self.vae_scale_factor,
            scaling_factor=float(vae.get("scaling_factor", 0.18215)) if self.vae is not None else 1.0,
            guidance=self.guidance,
            steps=self.steps,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SDConfig:
        """Build from the JSON form used by presets and checkpoints; unknown keys are errors."""
        d = dict(d)
        if "text" in d:
            d["text"] = from_dict(TextConfig, d["text"], "stable-diffusion config 'text'")
        return from_dict(cls, d, "stable-diffusion config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.get("in_channels", 4))

    @property
    def sample_size(self) -> int:
        """The U-Net's trained latent side (pixels / vae_scale_factor)."""
        size = self.unet.get("sample_size", 64)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this: each down block but the last halves them."""
        return 2 ** (len(self.unet.get("block_out_channels", (320, 640, 1280, 1280))) - 1)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along a side (1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.get("block_out_channels", (64,))) - 1)


class StableDiffusion(nn.Module):
    def __init__(self, cfg: SDConfig):
        super().__init__()
        diffusers = require("diffusers", "diffusion")
        self.cfg = cfg
        self.text_encoder = TextTransformer(cfg.text, cfg.layer_norm_eps)
        self.unet = diffusers.UNet2DConditionModel(**cfg.unet)
        self.vae = diffusers.AutoencoderKL(**cfg.vae) if cfg.vae is not None else None

    def encode_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every token's features after the final norm, (B, N, C): the U-Net's conditioning
        (transformers' `CLIPTextModel` last_hidden_state; Stable Diffusion masks nothing but the future)."""
        return self.text_encoder.hidden_states(input_ids)

    def denoise(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """The U-Net's prediction (noise, v or sample, as the scheduler config says), (B, C, h, w)."""
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    def encode_image(self, sample: torch.Tensor) -> torch.Tensor:
        """An image in [-1, 1], (B, 3, H, W) -> the VAE posterior's mean (before the scaling factor),
        (B, C, h, w): diffusers' `retrieve_latents(..., sample_mode="argmax")`, deterministic."""
        if self.vae is None:
            raise ConfigError("a pixel-space model has no VAE encoder")
        return self.vae.encode(sample, return_dict=False)[0].mode()

    def decode_latents(self, latent_sample: torch.Tensor) -> torch.Tensor:
        """Latents (already divided by the scaling factor) -> an image in [-1, 1], (B, 3, H, W)."""
        if self.vae is None:
            raise ConfigError("a pixel-space model has no VAE decoder")
        return self.vae.decode(latent_sample, return_dict=False)[0]
