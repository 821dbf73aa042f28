"""MiniGPT-4 from its released parts: an HF BLIP-2 directory (image encoder, Q-Former, image
processor), an HF Llama directory (Vicuna or Llama-2 chat, with its tokenizer) and the released
projection checkpoint, whose `model` holds only `llama_proj.weight` and `llama_proj.bias`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models import decoder
from mmedge.models.blip2.hf import qformer_config, vision_config
from mmedge.models.checkpoint import assign_weights, load_weights, read_json_object
from mmedge.models.hf_import import read_image_processor, read_tokenizer, read_weights
from mmedge.models.registry import Parts, get_family
from mmedge.models.sources import LoadedModel

PROJECTION_KEYS = ("llama_proj.weight", "llama_proj.bias")


def _image_side(parts: Parts) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vision config, Q-Former config or None) of the HF BLIP-2 directory, as config JSON."""
    cfg = read_json_object(parts.vision / "config.json")
    if cfg.get("model_type") != "blip-2":
        raise UnsupportedError(
            f"{parts.vision}: --vision must be an HF BLIP-2 directory (model_type 'blip-2'), "
            f"got model_type {cfg.get('model_type')!r}"
        )
    v, q = cfg.get("vision_config") or {}, cfg.get("qformer_config") or {}
    vision = vision_config(v)
    if parts.variant != "vicuna":
        return vision, {}
    if q.get("use_qformer_text_input"):
        raise UnsupportedError(
            f"{parts.vision}: a Q-Former with text input (InstructBLIP) is not MiniGPT-4's"
        )
    return vision, qformer_config(q, vision["width"], cfg.get("num_query_tokens", 32))


def _projection(parts: Parts) -> dict[str, torch.Tensor]:
    """`llama_proj.weight` / `.bias` of the projection file (top level, or under 'model' as released)."""
    state: Any = load_weights(parts.projection, allow_pickle=parts.allow_pickle)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{parts.projection}: expected a dict of tensors {list(PROJECTION_KEYS)}")
    missing = [k for k in PROJECTION_KEYS if k not in state]
    extra = sorted(set(state) - set(PROJECTION_KEYS))
    if missing or extra:
        raise ConfigError(
            f"{parts.projection}: a MiniGPT-4 projection holds exactly {list(PROJECTION_KEYS)}; "
            f"missing {missing}, unexpected {extra[:5]}"
        )
    return {k: state[k] for k in PROJECTION_KEYS}


def _check_projection(parts: Parts, proj: dict[str, torch.Tensor], width_in: int, width_out: int) -> None:
    """The projection must read what the image side gives and write the LM's embedding width."""
    weight, bias = proj["llama_proj.weight"], proj["llama_proj.bias"]
    feeds = "the Q-Former's width" if parts.variant == "vicuna" else "4 x the ViT width (4 merged patches)"
    if weight.dim() != 2 or weight.shape[1] != width_in:
        raise ConfigError(
            f"{parts.projection}: llama_proj.weight {tuple(weight.shape)} reads {weight.shape[-1]} features, "
            f"but {parts.vision} gives {width_in} ({feeds}, variant {parts.variant!r})"
        )
    if weight.shape[0] != width_out or tuple(bias.shape) != (width_out,):
        raise ConfigError(
            f"{parts.projection}: llama_proj writes {weight.shape[0]} features (bias {tuple(bias.shape)}), "
            f"but the LM in {parts.llm} embeds tokens in {width_out}"
        )


def assemble(parts: Parts) -> LoadedModel:
    """The MiniGPT-4 model of `parts`, its tokenizer and image preprocessing, ready to export."""
    from mmedge.runtime.package import sha256_file

    family = get_family("minigpt4")
    if parts.variant not in family.variants:
        raise ConfigError(f"minigpt4 variant {parts.variant!r} is not one of {list(family.variants)}")
    for what, path in (("--vision", parts.vision), ("--llm", parts.llm)):
        if not path.is_dir():
            raise ConfigError(f"{what} {path} is not a directory; expected an HF model directory")
    if not parts.projection.is_file():
        raise ConfigError(f"--projection {parts.projection} is not a file")
    vision, qformer = _image_side(parts)
    text = decoder.hf_decoder_config(read_json_object(parts.llm / "config.json"), parts.max_context)
    raw = {"variant": parts.variant, "vision": vision, "text": text}
    if qformer:
        raw["qformer"] = qformer
    cfg = family.config_from_dict(raw)
    proj = _projection(parts)
    _check_projection(parts, proj, cfg.projection_in, cfg.text.embed_dim)

    image_prefixes = ("vision_model.", "qformer.", "query_tokens") if qformer else ("vision_model.",)
    image_state, image_files = read_weights(parts.vision, parts.allow_pickle, image_prefixes)
    lm_state, lm_files = read_weights(parts.llm, parts.allow_pickle)
    state = {**image_state, **{f"language_model.{k}": v for k, v in lm_state.items()}, **proj}
    decoder.tie_lm_head(state, cfg.text, "language_model.")
    model = family.build(cfg)
    assign_weights(model, state, f"minigpt4 from {parts.vision}, {parts.llm}, {parts.projection}")

    def record(files: tuple[Path, ...] | list[Path]) -> dict[str, str]:
        return {f.name: sha256_file(f) for f in files}

    source = {
        "kind": "assembled",
        "vision": {"path": str(parts.vision.resolve()), "weights": record(image_files)},
        "llm": {"path": str(parts.llm.resolve()), "weights": record(lm_files)},
        "projection": {"path": str(parts.projection.resolve()), "weights": record([parts.projection])},
    }
    return LoadedModel(
        family,
        cfg,
        model.eval(),
        read_tokenizer(parts.llm, family, cfg),
        read_image_processor(parts.vision, family.preprocess(cfg)),
        source,
    )
