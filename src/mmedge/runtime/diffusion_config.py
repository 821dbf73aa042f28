"""The manifest's `diffusion` section: how an image-generation package denoises and decodes.

The scheduler is data (`schedulers.SchedulerConfig`, read from diffusers' `scheduler_config.json`
at export); the latent geometry says how pixels map to the U-Net's latents, and the defaults are
what `generate` uses when a caller names no steps or guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmedge.errors import ConfigError
from mmedge.runtime.schedulers import MAX_STEPS, SchedulerConfig

MAX_GUIDANCE = 100.0  # classifier-free guidance scales in use run from 1 to ~20
MAX_LATENT_CHANNELS = 64


@dataclass(frozen=True)
class DiffusionConfig:
    """Denoising and decoding settings of an image-generation package.

    Latents are (batch, latent_channels, h, w) with h and w multiples of `latent_multiple`; the
    image is `vae_scale_factor` times larger (1: a pixel-space U-Net whose latents are the image).
    Before the VAE decoder, latents are divided by `scaling_factor` and `shift_factor` is added,
    as diffusers' pipelines do.
    """

    scheduler: SchedulerConfig
    latent_channels: int
    sample_size: int  # the U-Net's trained latent side: the default image is this times vae_scale_factor
    latent_multiple: int = 1
    vae_scale_factor: int = 1
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    guidance: float = 7.5
    steps: int = 25

    def __post_init__(self) -> None:
        for name, most in (
            ("latent_channels", MAX_LATENT_CHANNELS),
            ("sample_size", 4096),
            ("latent_multiple", 4096),
            ("vae_scale_factor", 64),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ConfigError(f"diffusion.{name} must be an int in [1, {most}], got {value!r}")
        if self.sample_size % self.latent_multiple:
            raise ConfigError(
                f"diffusion.sample_size {self.sample_size} is not a multiple of latent_multiple {self.latent_multiple}"
            )
        if not (
            math.isfinite(self.scaling_factor)
            and self.scaling_factor > 0
            and math.isfinite(self.shift_factor)
        ):
            raise ConfigError("diffusion.scaling_factor must be positive and shift_factor finite")
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            raise ConfigError(f"diffusion.guidance must be in [0, {MAX_GUIDANCE:g}], got {self.guidance}")
        if isinstance(self.steps, bool) or not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"diffusion.steps must be in [1, {MAX_STEPS}], got {self.steps}")
