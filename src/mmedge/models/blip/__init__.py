"""The blip family: BLIP's retrieval (`itm`), captioning (`caption`) and VQA (`vqa`) models.

`itm` (task retrieval). Components: `vision` (image_encoder: pixels -> the ITC image embedding and
every token's features), `text` (text_encoder: token ids -> the ITC text embedding, the fusion
encoder's text mode) and `itm` (itm: image features + token ids -> (no match, match) logits, the
fusion encoder cross-attending to the image). The retrieval pipeline searches with the ITC vectors
and re-scores the top candidates with `itm` (docs/retrieval.md). The ITM graph is quantized
weight-only: its inputs come from two paths, so there is no single path to calibrate its
activations from.

`caption` and `vqa` (task chat): a text decoder that cross-attends to an encoder's states
(docs/generation.md, "Cross-attention decoders"). Components: `vision` (image_encoder: every image
token's features), for `vqa` `question` (question_encoder: the question read with cross-attention
to the image), `cross` (cross_kv: the decoder's per-layer cross keys/values of the image features or
the question states, once per image or question), `embed` (token_embed) and `llm` (llm_step).
"""

from __future__ import annotations

import math

from torch import nn

from mmedge.models.blip.decoder import DecoderStep, cross_names
from mmedge.models.blip.hf import ARCHITECTURES, blip_config, blip_weights
from mmedge.models.blip.modeling import VARIANTS, BlipConfig, ItmModelConfig, build
from mmedge.models.component import ComponentDecl, bound, within
from mmedge.models.decoder import cache_names
from mmedge.models.registry import Family, HFSupport, Sections, register
from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.sections import LLMConfig, PreprocessConfig, PromptConfig, RetrievalConfig

LABEL_TEMPLATES = ("a picture of {}.", "{}")
# The decoder's prompts. caption: HF's generate starts from [DEC] (replacing the processor's [CLS])
# and the prompt text, without the final [SEP]. vqa: the question goes to the question encoder as the
# tokenizer encodes it ([CLS] question [SEP]); the answer decoder starts from [DEC] (`caption`).
PROMPTS = {
    "caption": PromptConfig(first_turn="{bos}{prompt}", turn=" {prompt}", caption="{bos}"),
    "vqa": PromptConfig(first_turn="{prompt}", turn="{prompt}", caption="{bos}"),
}


def components(cfg: BlipConfig) -> tuple[ComponentDecl, ...]:
    """itm: `itm_components`; caption / vqa: the cross-attention decoder's (`decoder_components`)."""
    return itm_components(cfg) if cfg.variant == "itm" else decoder_components(cfg)


def itm_components(cfg: ItmModelConfig) -> tuple[ComponentDecl, ...]:
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


def decoder_components(cfg: BlipConfig) -> tuple[ComponentDecl, ...]:
    """vision (image features), [question], cross (cross keys/values, batch 1), embed, llm."""
    v, t, s = cfg.vision, cfg.text, cfg.vision.image_size
    heads, d, ctx = t.heads, t.hidden // t.heads, cfg.max_context
    batch, steps = DimRange(1, 1, 8), DimRange(1, min(16, ctx), ctx)
    features = TensorSpec("image_features", "float32", ("batch", v.tokens, v.width))
    decls = [
        ComponentDecl(
            name="vision",
            role="image_encoder",
            inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, s, s)),),
            outputs=(features,),
            dims={"batch": batch},
            build=bound("image_features"),
            calibration_data="images",
        )
    ]
    # What the decoder cross-attends to: the image's features, or the question's states (VQA).
    memory: int | str = v.tokens
    cross_dims: dict[str, DimRange] = {}
    source = TensorSpec("image_features", "float32", (1, v.tokens, v.width))
    if cfg.variant == "vqa":
        q = t.max_positions
        question = DimRange(1, min(16, q), q)
        memory, cross_dims = "memory", {"memory": question}
        source = TensorSpec("question_states", "float32", (1, "memory", t.hidden))
        decls.append(
            ComponentDecl(
                name="question",
                role="question_encoder",
                inputs=(
                    features,
                    TensorSpec("input_ids", "int64", ("batch", "sequence")),
                    TensorSpec("attention_mask", "int64", ("batch", "sequence")),
                ),
                outputs=(TensorSpec("question_states", "float32", ("batch", "sequence", t.hidden)),),
                dims={"batch": batch, "sequence": question},
                build=bound("encode_question"),
                calibration_data="none",  # inputs from the image path and the text: weight-only
                int_ranges={"input_ids": (0, t.vocab_size), "attention_mask": (1, 2)},
            )
        )
    cross = tuple(TensorSpec(n, "float32", (1, heads, memory, d)) for n in cross_names(t.layers))
    decls.append(
        ComponentDecl(
            name="cross",
            role="cross_kv",
            inputs=(source,),
            outputs=cross,
            dims=cross_dims,
            build=within("text_decoder", bound("cross_kv")),
            calibration_data="none",
        )
    )
    past_names, present_names = cache_names(t.layers)
    decls += [
        ComponentDecl(
            name="embed",
            role="token_embed",
            inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
            outputs=(TensorSpec("inputs_embeds", "float32", ("batch", "sequence", t.hidden)),),
            dims={"batch": batch, "sequence": steps},
            build=within("text_decoder", bound("embed_tokens")),
            calibration_data="none",
            int_ranges={"input_ids": (0, t.vocab_size)},
        ),
        ComponentDecl(
            name="llm",
            role="llm_step",
            inputs=(
                TensorSpec("inputs_embeds", "float32", ("batch", "sequence", t.hidden)),
                TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
                TensorSpec("position_ids", "int64", ("batch", "sequence")),
                TensorSpec("logits_to_keep", "int64", (1,)),
                *(TensorSpec(n, "float32", ("batch", heads, ctx, d)) for n in past_names),
                *cross,
            ),
            outputs=(
                TensorSpec("logits", "float32", ("batch", "kept", t.vocab_size)),
                *(TensorSpec(n, "float32", ("batch", heads, "sequence", d)) for n in present_names),
            ),
            dims={
                "batch": batch,
                "sequence": steps,
                "total_sequence": DimRange(ctx + 1, ctx + steps.opt, 2 * ctx),
                **cross_dims,
            },
            build=lambda model: DecoderStep(model.text_decoder),
            calibration_data="none",  # weight-only quantization
            parity_atol=1e-3,
            int_ranges={"attention_mask": (1, 2), "position_ids": (0, ctx), "logits_to_keep": (1, steps.opt)},
        ),
    ]
    return tuple(decls)


def preprocess(cfg: BlipConfig) -> PreprocessConfig:
    """BlipImageProcessor's: both sides resized to the input size (bicubic), CLIP mean/std."""
    return PreprocessConfig(cfg.vision.image_size, cfg.mean, cfg.std, resize="exact")


def sections(cfg: BlipConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    if cfg.variant != "itm":
        t = cfg.text
        llm = LLMConfig(
            max_context=cfg.max_context,
            layers=t.layers,
            kv_heads=t.heads,
            head_dim=t.hidden // t.heads,
            vocab_size=t.vocab_size,
            bos_token_id=cfg.bos_token_id,  # [DEC]: HF's generate puts it in place of [CLS]
            eos_token_id=cfg.sep_token_id,  # generation ends at [SEP]
            pad_token_id=t.pad_token_id,
        )
        return Sections(
            context_length=t.max_positions, pad_id=t.pad_token_id, llm=llm, prompt=PROMPTS[cfg.variant]
        )
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
        variants=VARIANTS,
        summary="BLIP: ViT + BERT; retrieval (ITC, ITM re-ranking), captioning, VQA (cross-attention decoders)",
        config_from_dict=BlipConfig.from_dict,
        variant_of=lambda cfg: cfg.variant,
        build=build,
        components=components,
        preprocess=preprocess,
        sections=sections,
        hf=HFSupport(
            model_types=("blip",), architectures=ARCHITECTURES, config=blip_config, weights=blip_weights
        ),
        task_of=lambda cfg: "retrieval" if cfg.variant == "itm" else "chat",
        recipe="mmedge.recipes.blip",
    )
)
