"""The blip2 family: frozen image encoder, Q-Former, projector and a frozen decoder LM (image chat).

Components, in image-path order: `vision` (image_encoder), `qformer` (image_resampler: a fixed
number of query tokens), `projector` (image_projector: into the LM's embedding width); then the
LM's `embed` (token_embed) and `llm` (llm_step). The image's query embeddings go before the prompt
("{image}{bos}Question: ... Answer:"), as HF's BLIP-2 places them. Variants: the LM's decoder variant.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from mmedge.models import decoder
from mmedge.models.blip2.hf import blip2_config, blip2_weights
from mmedge.models.blip2.modeling import Blip2, Blip2Config
from mmedge.models.component import ComponentDecl, bound, within
from mmedge.models.registry import Family, HFSupport, Sections, register
from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.sections import ImageTokens, PreprocessConfig, PromptConfig


def components(cfg: Blip2Config) -> tuple[ComponentDecl, ...]:
    """vision, qformer, projector, then the LM's embed and llm."""
    v, q, s = cfg.vision, cfg.qformer, cfg.vision.image_size
    batch = DimRange(1, 1, 16)
    image = TensorSpec("image_embeds", "float32", ("batch", v.tokens, v.width))
    query = TensorSpec("query_output", "float32", ("batch", q.num_query_tokens, q.hidden))
    prefix = TensorSpec("image_prefix", "float32", ("batch", q.num_query_tokens, cfg.text.embed_dim))
    pixels = TensorSpec("pixel_values", "float32", ("batch", 3, s, s))
    return (
        ComponentDecl(
            "vision", "image_encoder", (pixels,), (image,), {"batch": batch}, bound("image_features")
        ),
        ComponentDecl(
            "qformer", "image_resampler", (image,), (query,), {"batch": batch}, bound("query_outputs")
        ),
        ComponentDecl(
            "projector",
            "image_projector",
            (query,),
            (prefix,),
            {"batch": batch},
            bound("language_projection"),
        ),
        *(replace(d, build=within("language_model", d.build)) for d in decoder.components(cfg.text)),
    )


def preprocess(cfg: Blip2Config) -> PreprocessConfig:
    return PreprocessConfig(cfg.vision.image_size, cfg.mean, cfg.std, resize=cfg.resize, crop="center")


def sections(cfg: Blip2Config, model: nn.Module, tokenizer_json: str) -> Sections:
    bos = decoder.bos_marker(tokenizer_json, cfg.text.bos_token_id)
    question = cfg.prompt_template.replace("{}", "{prompt}")
    return Sections(
        context_length=cfg.text.max_context,
        pad_id=cfg.text.pad_token_id,
        llm=decoder.llm_section(cfg.text),
        prompt=PromptConfig(
            first_turn="{image}" + bos + question,
            turn=" " + question,
            answer=" {answer}",
            caption="{image}" + bos + cfg.caption_prompt,
        ),
        image_tokens=ImageTokens("fixed", cfg.qformer.num_query_tokens),
    )


FAMILY = register(
    Family(
        name="blip2",
        task="chat",
        variants=tuple(decoder.VARIANTS),
        summary="BLIP-2: image encoder, Q-Former, projector, decoder LM (captions, VQA, chat)",
        config_from_dict=Blip2Config.from_dict,
        variant_of=lambda cfg: cfg.text.variant,
        build=Blip2,
        components=components,
        preprocess=preprocess,
        sections=sections,
        hf=HFSupport(
            model_types=("blip-2",),
            architectures=("Blip2ForConditionalGeneration (OPT LM)",),
            config=blip2_config,
            weights=blip2_weights,
        ),
        recipe="mmedge.recipes.blip2",
    )
)
