"""The blip family: BLIP's image-text retrieval model (ITC embeddings, ITM re-ranking).

Components: `vision` (image_encoder: pixels -> the ITC image embedding and every token's features),
`text` (text_encoder: token ids -> the ITC text embedding, the fusion encoder's text mode) and `itm`
(itm: image features + token ids -> (no match, match) logits, the fusion encoder cross-attending to
the image). The retrieval pipeline searches with the ITC vectors and re-scores the top candidates
with `itm` (docs/retrieval.md). The ITM graph is quantized weight-only: its inputs come from two
paths, so there is no single path to calibrate its activations from.
"""

from __future__ import annotations

import math
from typing import Protocol

from torch import nn

from mmedge.models.blip.hf import ARCHITECTURE, blip_config
from mmedge.models.blip.modeling import Blip, BlipConfig
from mmedge.models.blip2.modeling import Blip2VisionConfig
from mmedge.models.component import ComponentDecl, bound
from mmedge.models.fusion import FusionConfig
from mmedge.models.registry import Family, HFSupport, Sections, register
from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.sections import PreprocessConfig, RetrievalConfig

LABEL_TEMPLATES = ("a picture of {}.", "{}")


class ItmModelConfig(Protocol):
    """What the components read of a ViT + fusion-encoder config (BLIP's, ALBEF's)."""

    @property
    def vision(self) -> Blip2VisionConfig: ...
    @property
    def text(self) -> FusionConfig: ...
    @property
    def embed_dim(self) -> int: ...


def components(cfg: ItmModelConfig) -> tuple[ComponentDecl, ...]:
    """vision (two outputs: the path's ITC embedding first), text, itm; the model has
    `encode_image`, `encode_text` and `itm_logits` (the albef family's too)."""
    v, t, s, d = cfg.vision, cfg.text, cfg.vision.image_size, cfg.embed_dim
    batch, ctx = DimRange(1, 1, 64), t.max_positions
    sequence = DimRange(1, min(16, ctx), ctx)
    features = TensorSpec("image_features", "float32", ("batch", v.tokens, v.width))
    ids = TensorSpec("input_ids", "int64", ("batch", "sequence"))
    mask = TensorSpec("attention_mask", "int64", ("batch", "sequence"))
    int_ranges = {"input_ids": (0, t.vocab_size), "attention_mask": (1, 2)}
    return (
        ComponentDecl(
            name="vision",
            role="image_encoder",
            inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, s, s)),),
            outputs=(TensorSpec("image_embeds", "float32", ("batch", d)), features),
            dims={"batch": batch},
            build=bound("encode_image"),
            calibration_data="images",
        ),
        ComponentDecl(
            name="text",
            role="text_encoder",
            inputs=(ids, mask),
            outputs=(TensorSpec("text_embeds", "float32", ("batch", d)),),
            dims={"batch": batch, "sequence": sequence},
            build=bound("encode_text"),
            calibration_data="texts",
            int_ranges=int_ranges,
        ),
        ComponentDecl(
            name="itm",
            role="itm",
            inputs=(features, ids, mask),
            outputs=(TensorSpec("itm_logits", "float32", ("batch", 2)),),
            # opt: the pipeline's default re-rank depth, scored in one batch
            dims={"batch": DimRange(1, 16, 64), "sequence": sequence},
            build=bound("itm_logits"),
            calibration_data="none",
            int_ranges=int_ranges,
        ),
    )


def preprocess(cfg: BlipConfig) -> PreprocessConfig:
    """BlipImageProcessor's: both sides resized to the input size (bicubic), CLIP mean/std."""
    return PreprocessConfig(cfg.vision.image_size, cfg.mean, cfg.std, resize="exact")


def sections(cfg: BlipConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    return Sections(
        context_length=cfg.text.max_positions,
        pad_id=cfg.text.pad_token_id,
        # The ITM model keeps no learned temperature: zero-shot uses the config's initial one.
        retrieval=RetrievalConfig(
            logit_scale=math.exp(cfg.logit_scale_init), label_templates=LABEL_TEMPLATES
        ),
    )


FAMILY = register(
    Family(
        name="blip",
        task="retrieval",
        variants=("itm",),
        summary="BLIP retrieval: ViT + BERT text encoder (ITC), fusion encoder re-ranking (ITM)",
        config_from_dict=BlipConfig.from_dict,
        variant_of=lambda cfg: "itm",
        build=Blip,
        components=components,
        preprocess=preprocess,
        sections=sections,
        hf=HFSupport(model_types=("blip",), architectures=(ARCHITECTURE,), config=blip_config),
    )
)
