"""A tiny random Stable Diffusion pipeline written with diffusers' own `save_pretrained`, for tests
that need the real diffusers directory layout (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) without a model hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

CONTEXT = 16  # the text encoder's positions; the tokenizer pads and truncates to this
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
}
# Stable Diffusion 1.5's noise schedule
SD15_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


def text_parts(context: int, hidden: int, layers: int, heads: int, intermediate: int) -> tuple[Any, Any]:
    """(tokenizer, CLIPTextModel) of a pipeline: the synthetic-scene tokenizer as a transformers fast
    tokenizer that pads and truncates to `context`, and a random text encoder of these sizes."""
    import transformers

    from mmedge.models.init import tiny_tokenizer_json

    backend = Tokenizer.from_str(tiny_tokenizer_json(generative=False))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=context,
        pad_token=backend.id_to_token(0),
        bos_token=backend.id_to_token(1),
        eos_token=backend.id_to_token(3),
    )
    config = transformers.CLIPTextConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=context,
        eos_token_id=3,
        pad_token_id=0,
        bos_token_id=1,
    )
    return tokenizer, transformers.CLIPTextModel(config)


def tiny_sd_pipeline(kind: str = "ddim", vae: bool = True, seed: int = 0, pooled_text: bool = False) -> Any:
    """A StableDiffusionPipeline with a 2-block U-Net (8x8 latents), a 2-block VAE (16x16 images)
    and a 2-layer CLIP text encoder over the synthetic-scene tokenizer; `pooled_text` adds diffusers'
    text-pooled timestep embedding (`addition_embed_type="text"`, what sd-tiny uses)."""
    import diffusers

    torch.manual_seed(seed)
    tokenizer, text = text_parts(CONTEXT, hidden=32, layers=2, heads=2, intermediate=64)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        **({"addition_embed_type": "text", "addition_embed_type_num_heads": 2} if pooled_text else {}),
    )
    autoencoder = (
        diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
        )
        if vae
        else None
    )
    scheduler = getattr(diffusers, SCHEDULERS[kind]).from_config(SD15_SCHEDULE)
    return diffusers.StableDiffusionPipeline(
        vae=autoencoder,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_sd(root: Path, kind: str = "ddim", seed: int = 0, pooled_text: bool = False) -> Any:
    """Save `tiny_sd_pipeline(kind, ...)` into `root`; returns the pipeline (float32, eval mode)."""
    pipe = tiny_sd_pipeline(kind, seed=seed, pooled_text=pooled_text)
    pipe.save_pretrained(root, safe_serialization=True)
    return pipe
