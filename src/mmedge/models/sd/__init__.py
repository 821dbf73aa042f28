"""The stable-diffusion family: text-to-image with a conditional U-Net (image_generation task).

Components: `text_encoder` (text path: token ids padded to the context -> per-token conditioning),
`unet` (denoiser: latents, timestep, conditioning -> model output, run once per step) and, for a
latent model, `vae_decoder` (latents -> image) and `vae_encoder` (image -> latents, for
image-to-image). The scheduler is data in the manifest's `diffusion`
section, run by the torch-free `runtime.schedulers`. Variants: "latent" (with a VAE, as Stable
Diffusion 1.x/2.x) and "pixel" (the U-Net draws the image itself: sd-tiny).
"""

from __future__ import annotations

from torch import nn

from mmedge.models.component import ComponentDecl, bound
from mmedge.models.registry import Family, Sections, register
from mmedge.models.sd.diffusers_dir import DIFFUSERS, check_tokenizer_length
from mmedge.models.sd.modeling import SDConfig, StableDiffusion
from mmedge.runtime.manifest import DimRange, TensorSpec

# Latent sides from the declared minimum up to twice the trained size (TensorRT profiles: min/opt/max).
MAX_SIDE_FACTOR = 2


def components(cfg: SDConfig) -> tuple[ComponentDecl, ...]:
    """Text encoder, U-Net and (latent variant) VAE encoder and decoder."""
    ctx, width, ch = cfg.text.context_length, cfg.text.width, cfg.latent_channels
    side = DimRange(cfg.latent_multiple, cfg.sample_size, MAX_SIDE_FACTOR * cfg.sample_size)
    latents = ("batch", ch, "height", "width")
    decls = [
        ComponentDecl(
            name="text_encoder",
            role="text_encoder",
            inputs=(TensorSpec("input_ids", "int64", ("batch", ctx)),),
            outputs=(TensorSpec("encoder_hidden_states", "float32", ("batch", ctx, width)),),
            dims={"batch": DimRange(1, 2, 2 * cfg.max_batch)},
            build=bound("encode_prompt"),
            calibration_data="texts",
            int_ranges={"input_ids": (0, cfg.text.vocab_size)},
        ),
        ComponentDecl(
            name="unet",
            role="denoiser",
            inputs=(
                TensorSpec("sample", "float32", latents),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", ctx, width)),
            ),
            outputs=(TensorSpec("out_sample", "float32", latents),),
            dims={"batch": DimRange(1, 2, 2 * cfg.max_batch), "height": side, "width": side},
            build=bound("denoise"),
            calibration_data="denoising",
            parity_atol=1e-3,
        ),
    ]
    if cfg.vae is not None:
        image = ("batch", 3, "image_height", "image_width")
        f = cfg.vae_scale_factor
        pixels = DimRange(side.min * f, side.opt * f, side.max * f)
        decls.append(
            ComponentDecl(
                name="vae_encoder",
                role="vae_encoder",
                inputs=(TensorSpec("sample", "float32", image),),
                outputs=(TensorSpec("latent", "float32", latents),),
                dims={"batch": DimRange(1, 1, cfg.max_batch), "image_height": pixels, "image_width": pixels},
                build=bound("encode_image"),
                # image-to-image only: text-to-image trajectories never run it, so calibration leaves
                # it in fp32 (one pass per image, beside a whole denoising loop)
                calibration_data="denoising",
                parity_atol=1e-3,
            )
        )
        decls.append(
            ComponentDecl(
                name="vae_decoder",
                role="vae_decoder",
                inputs=(TensorSpec("latent_sample", "float32", latents),),
                outputs=(TensorSpec("sample", "float32", image),),
                dims={"batch": DimRange(1, 1, cfg.max_batch), "height": side, "width": side},
                build=bound("decode_latents"),
                calibration_data="denoising",
                parity_atol=1e-3,
            )
        )
    return tuple(decls)


def sections(cfg: SDConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    check_tokenizer_length(tokenizer_json, cfg.text.context_length)
    return Sections(
        context_length=cfg.text.context_length, pad_id=cfg.text.pad_token_id, diffusion=cfg.diffusion()
    )


FAMILY = register(
    Family(
        name="stable-diffusion",
        task="image_generation",
        variants=("latent", "pixel"),
        summary="text-to-image: CLIP text encoder, conditional U-Net, VAE decoder; numpy schedulers",
        config_from_dict=SDConfig.from_dict,
        variant_of=lambda cfg: "latent" if cfg.vae is not None else "pixel",
        build=StableDiffusion,
        components=components,
        preprocess=lambda cfg: None,
        sections=sections,
        diffusers=DIFFUSERS,
        recipe="mmedge.recipes.sd",
    )
)
