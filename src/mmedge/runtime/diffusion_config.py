"""The manifest's `diffusion` section: how an image-generation package denoises and decodes.

The scheduler is data (`schedulers.SchedulerConfig`, read from diffusers' `scheduler_config.json`
at export); the latent geometry says how pixels map to the U-Net's latents, and the defaults are
what `generate` uses when a caller names no steps or guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmedge.errors import ConfigError, MmedgeError
from mmedge.runtime.schedulers import MAX_STEPS, SchedulerConfig, make_scheduler

MAX_GUIDANCE = 100.0  # classifier-free guidance scales in use run from 1 to ~20
MAX_LATENT_CHANNELS = 64
# One image's latents, in elements: every buffer of a call (noise, sample, the denoiser's input and
# output, the scheduler's) is this or twice it. SD 1.5 at 1024 px has 4 x 128 x 128 = 65536.
MAX_LATENT_ELEMENTS = 1 << 22
MAX_IMAGE_SIDE = 4096  # pixels along a side of a decoded image (as preprocess.image_size)
MIN_SCALING_FACTOR = 1e-4  # latents are divided by it: a tiny factor overflows float32


@dataclass(frozen=True)
class DiffusionConfig:
    """Denoising and decoding settings of an image-generation package.

    Latents are (batch, latent_channels, h, w) with h and w multiples of `latent_multiple`; the
    image is `vae_scale_factor` times larger (1: a pixel-space U-Net whose latents are the image).
    Before the VAE decoder, latents are divided by `scaling_factor`, as diffusers'
    StableDiffusionPipeline does.
    """

    scheduler: SchedulerConfig
    latent_channels: int
    sample_size: int  # the U-Net's trained latent side: the default image is this times vae_scale_factor
    latent_multiple: int = 1
    vae_scale_factor: int = 1
    scaling_factor: float = 1.0
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
        if self.latent_channels * self.sample_size**2 > MAX_LATENT_ELEMENTS:
            raise ConfigError(
                f"diffusion: {self.latent_channels} x {self.sample_size}^2 latents exceed {MAX_LATENT_ELEMENTS} elements"
            )
        if self.sample_size * self.vae_scale_factor > MAX_IMAGE_SIDE:
            raise ConfigError(f"diffusion: the default image side exceeds {MAX_IMAGE_SIDE} pixels")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor >= MIN_SCALING_FACTOR):
            raise ConfigError(f"diffusion.scaling_factor must be a finite number >= {MIN_SCALING_FACTOR:g}")
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            raise ConfigError(f"diffusion.guidance must be in [0, {MAX_GUIDANCE:g}], got {self.guidance}")
        if isinstance(self.steps, bool) or not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"diffusion.steps must be in [1, {MAX_STEPS}], got {self.steps}")
        try:  # the default steps must be a schedule the scheduler can make
            make_scheduler(self.scheduler, self.steps)
        except MmedgeError as exc:
            raise ConfigError(f"diffusion.steps {self.steps} with this scheduler: {exc}") from None
