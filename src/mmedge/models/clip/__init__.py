"""The clip family: a ViT image tower and a causal text tower trained with ITC (retrieval, zero-shot).

Components: `vision` (image_encoder: pixels -> image embedding) and `text` (text_encoder: token ids
-> text embedding). The learned temperature goes to the manifest's `retrieval.logit_scale`, so
zero-shot probabilities equal the model's own `logits_per_image.softmax(-1)`.
"""

from __future__ import annotations

import math

from torch import nn

from mmedge.models.clip.hf import clip_config
from mmedge.models.clip.modeling import CLIP, CLIPConfig
from mmedge.models.component import ComponentDecl
from mmedge.models.dual_encoder import image_tower, text_tower
from mmedge.models.registry import Family, HFSupport, Sections, register
from mmedge.runtime.manifest import DimRange
from mmedge.runtime.sections import CLIP_MEAN, CLIP_STD, PreprocessConfig, RetrievalConfig

LABEL_TEMPLATES = ("a photo of {}.", "a picture of {}.", "{}")


def components(cfg: CLIPConfig) -> tuple[ComponentDecl, ...]:
    """The two exportable towers of a CLIP model."""
    batch = DimRange(1, 1, 64)
    return (
        image_tower(cfg.vision.image_size, cfg.projection_dim, batch),
        text_tower(cfg.text.vocab_size, cfg.text.context_length, cfg.projection_dim, batch),
    )


def preprocess(cfg: CLIPConfig) -> PreprocessConfig:
    """OpenAI CLIP's: shortest edge to the input size, centre crop, CLIP mean/std."""
    return PreprocessConfig(cfg.vision.image_size, CLIP_MEAN, CLIP_STD, resize="shortest", crop="center")


def sections(cfg: CLIPConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    # The learned temperature, as transformers applies it (exp, no clamp at inference).
    scale = math.exp(float(model.logit_scale.detach()))
    return Sections(
        context_length=cfg.text.context_length,
        pad_id=cfg.text.pad_token_id,
        retrieval=RetrievalConfig(logit_scale=scale, label_templates=LABEL_TEMPLATES),
    )


FAMILY = register(
    Family(
        name="clip",
        task="retrieval",
        variants=("vit",),
        summary="CLIP dual encoder: ViT image tower + causal text tower (ITC)",
        config_from_dict=CLIPConfig.from_dict,
        variant_of=lambda cfg: "vit",
        build=CLIP,
        components=components,
        preprocess=preprocess,
        sections=sections,
        hf=HFSupport(model_types=("clip",), architectures=("CLIPModel",), config=clip_config),
        recipe="mmedge.recipes.clip",
    )
)
