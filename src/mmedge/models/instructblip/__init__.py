"""The instructblip family: BLIP-2 whose Q-Former also reads the instruction (image chat).

Components, in image-path order: `vision` (image_encoder), `qformer` (image_resampler: reads the
image features and the instruction, `qformer_input_ids` / `qformer_attention_mask` tokenised with
the package's `instruction_tokenizer`), `projector` (image_projector); then the LM's `embed`
(token_embed) and `llm` (llm_step). As HF's processor does, the query embeddings go before the
raw instruction ("{image}{bos}{prompt}"). Variants: the LM's decoder variant (OPT, Llama).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from mmedge.models import blip2, decoder
from mmedge.models.component import ComponentDecl, bound
from mmedge.models.instructblip.hf import instructblip_config, instructblip_weights
from mmedge.models.instructblip.modeling import InstructBlip, InstructBlipConfig
from mmedge.models.registry import Family, HFSupport, Sections, register
from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.sections import INSTRUCTION_SOURCES


def components(cfg: InstructBlipConfig) -> tuple[ComponentDecl, ...]:
    """blip2's components, with a Q-Former that also takes the instruction (up to its positions)."""
    q = cfg.qformer
    ids, mask = (TensorSpec(name, "int64", ("batch", "instruction")) for name in INSTRUCTION_SOURCES)
    length = DimRange(1, min(32, q.max_text_positions), q.max_text_positions)
    return tuple(
        replace(
            d,
            inputs=(*d.inputs, ids, mask),
            dims={**d.dims, "instruction": length},
            build=bound("instructed_query_outputs"),
            int_ranges={ids.name: (0, q.vocab_size), mask.name: (1, 2)},
        )
        if d.role == "image_resampler"
        else d
        for d in blip2.components(cfg)
    )


def sections(cfg: InstructBlipConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    """blip2's sections (prompt from the raw-instruction template) and the instruction tokenizer's."""
    return replace(
        blip2.sections(cfg, model, tokenizer_json),
        instruction_context_length=cfg.qformer.max_text_positions,
        instruction_pad_id=cfg.qformer.pad_token_id,
    )


FAMILY = register(
    Family(
        name="instructblip",
        task="chat",
        variants=tuple(decoder.VARIANTS),
        summary="InstructBLIP: BLIP-2 whose Q-Former also reads the instruction (VQA, chat)",
        config_from_dict=InstructBlipConfig.from_dict,
        variant_of=lambda cfg: cfg.text.variant,
        build=InstructBlip,
        components=components,
        preprocess=blip2.preprocess,
        sections=sections,
        hf=HFSupport(
            model_types=("instructblip",),
            architectures=("InstructBlipForConditionalGeneration (OPT, Llama LMs)",),
            config=instructblip_config,
            weights=instructblip_weights,
            instruction_tokenizer="qformer_tokenizer",
        ),
        recipe="mmedge.recipes.instructblip",
    )
)
