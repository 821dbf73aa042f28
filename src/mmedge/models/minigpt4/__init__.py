"""The minigpt4 family: MiniGPT-4's image chat, assembled from its released parts (`mmedge assemble`).

Components, in image-path order: `vision` (image_encoder: BLIP-2's ViT), for the vicuna variant
`qformer` (image_resampler), then `projector` (image_projector: `llama_proj`, after merging
patch tokens in the llama2 variant); then the LM's `embed` (token_embed) and `llm` (llm_step).

The prompts are the official demo's conversations (`minigpt4/conversation/conversation.py`): a
system text, then "###Human: <Img>{image}</Img> {question}###Assistant: " (vicuna) or
"<s>[INST] <Img>{image}</Img> {question} [/INST] " (llama2). The demo cuts every answer at "###".
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from mmedge.models import decoder
from mmedge.models.component import ComponentDecl, bound, within
from mmedge.models.minigpt4.modeling import VARIANTS, MiniGPT4, MiniGPT4Config
from mmedge.models.minigpt4.parts import assemble
from mmedge.models.registry import Family, Sections, register
from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.sections import ImageTokens, PreprocessConfig, PromptConfig

SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
# variant -> (text before a question, text after it): the demo's separator + role of each side.
# The llama2 demo writes "<s>" into the text, which the Llama tokenizer reads as BOS.
TURNS = {"vicuna": ("###Human: ", "###Assistant: "), "llama2": ("{bos}[INST] ", " [/INST] ")}
CAPTION_QUESTION = "Describe this image in detail."  # the first instruction of prompts/alignment.txt


def components(cfg: MiniGPT4Config) -> tuple[ComponentDecl, ...]:
    """vision, (vicuna) qformer, projector, then the LM's embed and llm."""
    v, s = cfg.vision, cfg.vision.image_size
    batch = {"batch": DimRange(1, 1, 16)}
    pixels = TensorSpec("pixel_values", "float32", ("batch", 3, s, s))
    image = TensorSpec("image_embeds", "float32", ("batch", v.tokens, v.width))
    prefix = TensorSpec("image_prefix", "float32", ("batch", cfg.image_tokens, cfg.text.embed_dim))
    image_side = [
        ComponentDecl("vision", "image_encoder", (pixels,), (image,), batch, bound("image_features"))
    ]
    if cfg.qformer is not None:
        query = TensorSpec(
            "query_output", "float32", ("batch", cfg.qformer.num_query_tokens, cfg.qformer.hidden)
        )
        image_side += [
            ComponentDecl("qformer", "image_resampler", (image,), (query,), batch, bound("query_outputs")),
            ComponentDecl("projector", "image_projector", (query,), (prefix,), batch, bound("llama_proj")),
        ]
    else:
        image_side.append(
            ComponentDecl(
                "projector", "image_projector", (image,), (prefix,), batch, bound("project_patches")
            )
        )
    return (
        *image_side,
        *(replace(d, build=within("language_model", d.build)) for d in decoder.components(cfg.text)),
    )


def preprocess(cfg: MiniGPT4Config) -> PreprocessConfig:
    # the official eval processor resizes both sides to image_size (bicubic), then normalises
    return PreprocessConfig(cfg.vision.image_size, cfg.mean, cfg.std, resize="exact", crop="center")


def sections(cfg: MiniGPT4Config, model: nn.Module, tokenizer_json: str) -> Sections:
    # The demo tokenises the text before the image with the tokenizer's specials (a Llama
    # tokenizer: BOS) and the rest without.
    bos = decoder.bos_marker(tokenizer_json, cfg.text.bos_token_id)
    before, after = TURNS[cfg.variant]
    first = bos + SYSTEM + before + "<Img>{image}</Img> {prompt}" + after
    return Sections(
        context_length=cfg.text.max_context,
        pad_id=cfg.text.pad_token_id,
        llm=decoder.llm_section(cfg.text),
        prompt=PromptConfig(
            first_turn=first,
            turn=before + "{prompt}" + after,
            answer="{answer}",
            caption=first.replace("{prompt}", CAPTION_QUESTION),
            stop_strings=("###",),
        ),
        image_tokens=ImageTokens("fixed", cfg.image_tokens),
    )


FAMILY = register(
    Family(
        name="minigpt4",
        task="chat",
        variants=VARIANTS,
        summary="MiniGPT-4: BLIP-2 image encoder (+ Q-Former), one Linear, Vicuna / Llama-2 LM (image chat)",
        config_from_dict=MiniGPT4Config.from_dict,
        variant_of=lambda cfg: cfg.variant,
        build=MiniGPT4,
        components=components,
        preprocess=preprocess,
        sections=sections,
        assemble=assemble,
    )
)
