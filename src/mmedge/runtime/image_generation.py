"""Text-to-image pipeline (torch-free): prompt -> conditioning -> scheduler loop over the denoiser ->
VAE decoder -> image, as diffusers' `StableDiffusionPipeline` runs it; with an image, image-to-image
as `StableDiffusionImg2ImgPipeline` runs it (the VAE encoder's latents noised part way, then the
schedule's last steps).

Classifier-free guidance runs the unconditional and conditional rows as one batch of the denoiser;
latents, the denoiser's input and its output live in buffers allocated once per call, so a step
copies nothing but the scaled latents into the denoiser's input (docs/diffusion.md).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmedge.errors import IntegrityError, InvalidInputError
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.diffusion_config import MAX_GUIDANCE, DiffusionConfig
from mmedge.runtime.schedulers import make_scheduler

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (steps done, steps in all)
Observer = Callable[[str, dict[str, np.ndarray]], None]  # (component, its feeds): calibration collects them


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image: `image` float32 (H, W, 3) RGB in [0, 1] (diffusers' output_type "np"),
    with the settings that made it."""

    image: np.ndarray
    seed: int | None  # None: drawn from caller-supplied latents
    steps: int
    guidance: float
    scheduler: str
    prompt_truncated: bool  # the prompt had more tokens than the text encoder's context and was cut
    strength: float | None = None  # image-to-image: how much of the schedule ran; None: text-to-image

    @property
    def pixels(self) -> np.ndarray:
        """uint8 (H, W, 3) RGB, rounded as diffusers' `numpy_to_pil`."""
        return (self.image * 255).round().astype(np.uint8)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the image as a PNG (atomically)."""
        from mmedge.runtime.images import encode_png
        from mmedge.runtime.staging import write_atomic

        write_atomic(path, encode_png(self.pixels))


class ImageGenerationPipeline:
    """`generate(prompt, ...)` for image_generation packages. Thread-safe: sessions are shared and
    every call owns its buffers and scheduler."""

    def __init__(self, runner: ComponentRunner):
        m = runner.manifest
        if m.diffusion is None:
            raise IntegrityError(f"package {m.name!r} has no diffusion section")
        self.runner = runner
        self.config: DiffusionConfig = m.diffusion
        self.denoiser = m.by_role("denoiser")
        self.decoder = m.by_role("vae_decoder") if m.has_role("vae_decoder") else None
        self.encoder = m.by_role("vae_encoder") if m.has_role("vae_encoder") else None
        entry = m.component(self.denoiser)
        side = entry.dims["height"], entry.dims["width"]
        self.latent_range = (side[0].min, side[0].max), (side[1].min, side[1].max)

    def __repr__(self) -> str:
        m = self.runner.manifest
        return (
            f"ImageGenerationPipeline({m.name!r}, family={m.family!r}, backend={self.runner.backend.name!r})"
        )

    @property
    def default_size(self) -> int:
        """Pixels along each side of an image when the caller names no size."""
        return self.config.sample_size * self.config.vae_scale_factor

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | None = None,
        scheduler: str | None = None,
        progress: Progress | None = None,
        observe: Observer | None = None,
        image: Any = None,
        strength: float = 0.8,
    ) -> GeneratedImage:
        """Draw one image of `prompt`, or with `image` redraw that image towards it.

        `steps` (1 to `schedulers.MAX_STEPS`, at most the schedule's training steps) and `guidance` (0 to MAX_GUIDANCE; above 1 runs classifier-free
        guidance against `negative_prompt`, default the empty prompt) default to the package's.
        `seed` makes the initial noise reproducible (numpy's PCG64; drawn at random when None, and
        reported in the result); `latents` (1, C, h, w) float32 replaces that noise (it is scaled by
        the scheduler's initial sigma, as in diffusers; the result's seed is then None).
        `height`/`width` in pixels are multiples of `vae_scale_factor * latent_multiple` inside the
        denoiser's declared range. `scheduler` overrides the package's kind (`SCHEDULER_KINDS`),
        keeping its noise schedule. A prompt longer than the text encoder's context is cut to it
        (as diffusers does), and the result says so. `progress(done, total)` runs after each step;
        `observe(component, feeds)` sees the denoiser's and the decoder's inputs before each run
        (the buffers themselves: copy what you keep).

        Image-to-image: `image` is what `images.load_image` reads (a path, encoded bytes, an array,
        a PIL image); its size is the result's (the same rules as `height`/`width`). Its latents
        (the VAE posterior's mean; in pixel space the pixels themselves) are noised to the level
        `strength` (0 to 1] of the way into the schedule, and only the schedule's last
        `int(steps * strength)` steps run, as in diffusers' img2img pipeline (which samples the
        posterior instead). `latents` is then the noise added; `progress` counts the steps that run.
        """
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        guidance = cfg.guidance if guidance is None else guidance
        if (
            isinstance(guidance, bool)
            or not isinstance(guidance, (int, float))
            or not 0 <= guidance <= MAX_GUIDANCE
        ):
            raise InvalidInputError(f"guidance must be a number in [0, {MAX_GUIDANCE:g}], got {guidance!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidInputError(f"seed must be a non-negative int, got {seed!r}")
        sched_config = cfg.scheduler if scheduler is None else cfg.scheduler.with_kind(scheduler)
        sched = make_scheduler(sched_config, steps)  # checks steps
        if image is not None:
            pixels = _checked_image(image, height, width)
            height, width = pixels.shape[2], pixels.shape[3]
            start = _start_index(steps, strength)
        h, w = self._latent_size(height, width)
        shape = (1, cfg.latent_channels, h, w)
        if latents is None:
            seed = secrets.randbits(63) if seed is None else seed  # reported, so any image can be redrawn
            noise = np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)
        else:
            noise, seed = _checked_latents(latents, shape), None
        guided = guidance > 1.0  # diffusers: guidance 1 or below is the conditional pass alone
        negative = (negative_prompt or "") if guided else None
        cond, truncated = self._conditioning(prompt, negative)
        if image is None:
            start = 0
            sample = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
        else:
            sched.set_begin_index(start)
            sample = sched.add_noise(self._encode(pixels, observe), noise)
        rows = 2 if guided else 1
        model_in = np.zeros((rows, *shape[1:]), np.float32)  # (rows, C, h, w); checked before step 0
        model_out = np.empty_like(model_in)
        timestep = np.zeros(rows, np.float32)
        session = self.runner.session(self.denoiser)
        binding = session.binding()
        feeds = {"sample": model_in, "timestep": timestep, "encoder_hidden_states": cond}
        self.runner.check_inputs(self.denoiser, feeds)
        if binding is not None:
            binding.bind({"encoder_hidden_states": cond}, {"out_sample": model_out})
        g = np.float32(guidance)
        for i in range(start, len(sched.timesteps)):
            scaled = sched.scale_model_input(sample, i)
            model_in[:] = scaled  # every row: the unconditional and conditional passes see one sample
            timestep[:] = sched.timesteps[i]
            if observe is not None:
                observe(self.denoiser, feeds)
            if binding is not None:
                # rebound every step: a GPU provider copies an input when it is bound, not when it runs
                binding.bind({"sample": model_in, "timestep": timestep}, {})
                binding.run()
            else:
                session.run_into(feeds, {"out_sample": model_out})
            if not np.isfinite(model_out).all():
                raise IntegrityError(f"component {self.denoiser!r} produced NaN or infinity at step {i}")
            if guided:  # uncond + g * (cond - uncond), in the first row
                np.subtract(model_out[1], model_out[0], out=model_out[1])
                np.multiply(model_out[1], g, out=model_out[1])
                np.add(model_out[0], model_out[1], out=model_out[0])
            sample = sched.step(model_out[:1], i, sample)
            if progress is not None:
                progress(i + 1 - start, len(sched.timesteps) - start)
        drawn = self._decode(sample, observe)
        return GeneratedImage(
            drawn,
            seed,
            steps,
            float(guidance),
            sched_config.kind,
            truncated,
            None if image is None else strength,
        )

    def _latent_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        cfg = self.config
        unit = cfg.vae_scale_factor * cfg.latent_multiple
        out = []
        for name, value, (low, high) in zip(("height", "width"), (height, width), self.latent_range):
            pixels = self.default_size if value is None else value
            if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels % unit:
                raise InvalidInputError(f"{name} must be a multiple of {unit} pixels, got {pixels!r}")
            latent = pixels // cfg.vae_scale_factor
            if not low <= latent <= high:
                raise InvalidInputError(
                    f"{name} {pixels} is outside what the denoiser was built for: "
                    f"{low * cfg.vae_scale_factor} to {high * cfg.vae_scale_factor} pixels"
                )
            out.append(latent)
        return out[0], out[1]

    def _conditioning(self, prompt: str, negative: str | None) -> tuple[np.ndarray, bool]:
        """The text path's conditioning, (rows, context, width): [negative, prompt] when guided."""
        tok = self.runner.tokenizer
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError("prompt must be a non-empty string")
        if negative is not None and not isinstance(negative, str):
            raise InvalidInputError(f"negative_prompt must be a string, got {type(negative).__name__}")
        ids = tok.encode_padded([prompt] if negative is None else [negative, prompt], tok.context_length)
        truncated = tok.overflows(prompt)
        if truncated:
            log.warning(
                "the prompt is longer than the text encoder's %d tokens; it was cut", tok.context_length
            )
        return self.runner.run_path("text", {"input_ids": ids}), truncated

    def _encode(self, pixels: np.ndarray, observe: Observer | None = None) -> np.ndarray:
        """(1, 3, H, W) in [-1, 1] -> the latents it starts from (scaled as the U-Net reads them)."""
        if self.encoder is None:
            if self.config.vae_scale_factor != 1:
                raise IntegrityError(
                    f"package {self.runner.manifest.name!r} has no vae_encoder, so it cannot start from an "
                    "image; export it again to add one"
                )
            return pixels  # pixel space: the U-Net denoises the image itself
        feeds = {"sample": pixels}
        if observe is not None:
            observe(self.encoder, feeds)
        latent = self.runner.run_batched(self.encoder, feeds)["latent"]
        return (latent * np.float32(self.config.scaling_factor)).astype(np.float32)

    def _decode(self, latents: np.ndarray, observe: Observer | None = None) -> np.ndarray:
        """Latents -> (H, W, 3) float32 in [0, 1]."""
        cfg = self.config
        if self.decoder is not None:
            scaled = (latents / np.float32(cfg.scaling_factor)).astype(np.float32)
            if observe is not None:
                observe(self.decoder, {"latent_sample": scaled})
            image = self.runner.run_batched(self.decoder, {"latent_sample": scaled})["sample"]
        else:
            image = latents
        return np.clip(image[0].transpose(1, 2, 0) / 2 + 0.5, 0.0, 1.0).astype(np.float32)


def _checked_image(src: object, height: int | None, width: int | None) -> np.ndarray:
    """An image (`images.load_image`) -> (1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor."""
    from mmedge.runtime.images import load_image

    image = load_image(src)
    for name, asked, size in (("height", height, image.shape[0]), ("width", width, image.shape[1])):
        if asked is not None and asked != size:
            raise InvalidInputError(
                f"{name} {asked} differs from the image's {size}: the result keeps its size"
            )
    x = image.astype(np.float32) / np.float32(255)
    return np.ascontiguousarray((x * 2 - 1).transpose(2, 0, 1)[None], dtype=np.float32)


def _start_index(steps: int, strength: object) -> int:
    """The schedule index image-to-image starts at (diffusers' `get_timesteps`); `steps` is checked."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise InvalidInputError(f"strength must be a number in (0, 1], got {strength!r}")
    if int(steps * strength) < 1:
        raise InvalidInputError(
            f"strength {strength:g} of {steps} steps runs no step (int(steps * strength) is 0); raise either"
        )
    return steps - int(steps * strength)


def _checked_latents(latents: object, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(latents, np.ndarray) or latents.dtype != np.float32 or latents.shape != shape:
        got = (
            f"{latents.dtype} {latents.shape}" if isinstance(latents, np.ndarray) else type(latents).__name__
        )
        raise InvalidInputError(f"latents must be a float32 array of shape {shape}, got {got}")
    if not np.isfinite(latents).all():
        raise InvalidInputError("latents contain NaN or infinity")
    return latents
