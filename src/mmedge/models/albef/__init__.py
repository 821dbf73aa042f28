"""The albef family: ALBEF's image-text retrieval model (ITC embeddings, ITM re-ranking).

Components and sections have the blip family's shape: `vision` (pixels -> the ITC image embedding
and every token's features), `text` (token ids -> the ITC text embedding, from the text-only lower
layers) and `itm` (image features + token ids -> (no match, match) logits, through every layer, the
upper ones cross-attending), so the retrieval pipeline re-ranks with it unchanged
(docs/retrieval.md). The learned temperature becomes the manifest's logit scale (1 / temp).
Checkpoints in the official layout load through `albef.official` (`mmedge export ALBEF.pth
--family albef`); `recipes/albef.py` trains `albef-tiny` with ITC (momentum distillation), ITM and MLM.
"""

from __future__ import annotations

from torch import nn

from mmedge.models.albef.modeling import Albef, AlbefConfig
from mmedge.models.albef.official import from_official
from mmedge.models.blip import itm_components
from mmedge.models.registry import Family, Sections, register
from mmedge.runtime.sections import PreprocessConfig, RetrievalConfig

LABEL_TEMPLATES = ("a picture of {}.", "{}")


def preprocess(cfg: AlbefConfig) -> PreprocessConfig:
    """ALBEF's test transform: both sides resized to the input size (bicubic), CLIP mean/std."""
    return PreprocessConfig(cfg.vision.image_size, cfg.mean, cfg.std, resize="exact")


def sections(cfg: AlbefConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    assert isinstance(model, Albef)
    return Sections(
        context_length=cfg.text.max_positions,
        pad_id=cfg.text.pad_token_id,
        retrieval=RetrievalConfig(logit_scale=model.logit_scale(), label_templates=LABEL_TEMPLATES),
    )


FAMILY = register(
    Family(
        name="albef",
        task="retrieval",
        variants=("itm",),
        summary="ALBEF retrieval: ViT + BERT whose upper layers fuse; ITC, ITM re-ranking",
        config_from_dict=AlbefConfig.from_dict,
        variant_of=lambda cfg: "itm",
        build=Albef,
        components=itm_components,
        preprocess=preprocess,
        sections=sections,
        official=from_official,
        recipe="mmedge.recipes.albef",
    )
)
