"""The llava family: CLIP vision tower, projector, decoder LM; the image goes where the chat template
writes its placeholder (LLaVA v1, LLaVA-1.5, LLaVA-NeXT).

Components, in image-path order: `vision` (image_encoder: the selected hidden states of the tower),
`projector` (image_projector: into the LM's embedding width); then the LM's `embed` and `llm`.
The conversation is rendered by the model's Jinja chat template (`runtime.chat_template`); one
image takes a fixed number of LM positions (v1, 1.5) or, for NeXT, as many as its tiles give.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from mmedge.models import decoder
from mmedge.models.component import ComponentDecl, bound, within
from mmedge.models.llava.hf import llava_config, llava_directory, llava_weights
from mmedge.models.llava.modeling import LLAVA_VARIANTS, Llava, LlavaConfig
from mmedge.models.registry import Family, HFSupport, Sections, register
from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.sections import AnyResConfig, ChatTemplate, ImageTokens, PreprocessConfig


def components(cfg: LlavaConfig) -> tuple[ComponentDecl, ...]:
    """vision, projector, then the LM's embed and llm."""
    s, t = cfg.vision.image_size, cfg.image_tokens
    batch = DimRange(1, 1, 32 if cfg.variant == "next" else 16)  # NeXT: the tiles of an image
    pixels = TensorSpec("pixel_values", "float32", ("batch", 3, s, s))
    features = TensorSpec("image_features", "float32", ("batch", t, cfg.feature_width))
    embeds = TensorSpec("image_embeds", "float32", ("batch", t, cfg.text.embed_dim))
    return (
        ComponentDecl(
            "vision", "image_encoder", (pixels,), (features,), {"batch": batch}, bound("image_features")
        ),
        ComponentDecl(
            "projector",
            "image_projector",
            (features,),
            (embeds,),
            {"batch": batch},
            bound("multi_modal_projector"),
        ),
        *(replace(d, build=within("language_model", d.build)) for d in decoder.components(cfg.text)),
    )


def preprocess(cfg: LlavaConfig) -> PreprocessConfig:
    return PreprocessConfig(cfg.vision.image_size, cfg.mean, cfg.std, pad_square=cfg.pad_square)


def _token(tokenizer_json: str, token_id: int) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json).id_to_token(token_id) or ""


NEWLINE_FILE = "image_newline.npy"


def _image_tokens(cfg: LlavaConfig, model: nn.Module) -> tuple[ImageTokens, dict[str, bytes]]:
    """(the image_tokens section, extra files): NeXT keeps its learned newline in a verified .npy."""
    if cfg.variant != "next":
        return ImageTokens("fixed", cfg.image_tokens), {}
    anyres = AnyResConfig(
        tuple(cfg.grid_pinpoints), cfg.vision.image_size, cfg.vision.patch_size, cfg.mean, cfg.std
    )
    out = io.BytesIO()
    np.save(out, model.image_newline.detach().to(torch.float32).numpy(), allow_pickle=False)
    return ImageTokens("anyres", cfg.image_tokens, anyres, NEWLINE_FILE), {NEWLINE_FILE: out.getvalue()}


def sections(cfg: LlavaConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    image_tokens, files = _image_tokens(cfg, model)
    return Sections(
        context_length=cfg.text.max_context,
        pad_id=cfg.text.pad_token_id,
        llm=decoder.llm_section(cfg.text),
        chat_template=ChatTemplate(
            template=cfg.chat_template,
            image_token=cfg.image_token,
            bos_token=_token(tokenizer_json, cfg.text.bos_token_id),
            eos_token=_token(tokenizer_json, cfg.text.eos_token_id),
            caption_prompt=cfg.caption_prompt,
        ),
        image_tokens=image_tokens,
        files=files,
    )


FAMILY = register(
    Family(
        name="llava",
        task="chat",
        variants=LLAVA_VARIANTS,
        summary="LLaVA v1 / 1.5 / NeXT: CLIP tower, projector, decoder LM; images anywhere in a chat template",
        config_from_dict=LlavaConfig.from_dict,
        variant_of=lambda cfg: cfg.variant,
        build=Llava,
        components=components,
        preprocess=preprocess,
        sections=sections,
        hf=HFSupport(
            model_types=("llava", "llava_next"),
            architectures=("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"),
            config=llava_config,
            weights=llava_weights,
            directory=llava_directory,
        ),
        special_tokens=lambda cfg: (cfg.image_token,),
        recipe="mmedge.recipes.llava",
    )
)
