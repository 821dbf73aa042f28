"""Diffusers-format directories (`StableDiffusionPipeline.save_pretrained`) -> the family's config
and state dict, read file by file without diffusers: `model_index.json`, `unet/`, `vae/`,
`text_encoder/`, `tokenizer/` and `scheduler/` configs and safetensors.

The safety checker and feature extractor a directory may name are not carried into the package: the
runtime has no safety checker, and the import log says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mmedge.errors import ConfigError, UnsupportedError, require
from mmedge.models.checkpoint import load_weights, read_json_object
from mmedge.models.registry import DiffusersSource, DiffusersSupport
from mmedge.runtime.schedulers import DIFFUSERS_CLASSES, SchedulerConfig

log = logging.getLogger(__name__)
PIPELINES = ("StableDiffusionPipeline",)
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
# A sampler the runtime does not implement (Stable Diffusion 1.5 ships PNDM) is replaced by this one
# over the same noise schedule, as diffusers users swap samplers with `Other.from_config(...)`.
FALLBACK_KIND = "dpmsolver++"


def _scheduler(path: Path) -> SchedulerConfig:
    raw = read_json_object(path)
    if raw.get("_class_name") in DIFFUSERS_CLASSES:
        return SchedulerConfig.from_diffusers(raw)
    log.warning(
        "%s: %s is not one of the runtime's samplers %s; the package samples with %s over the same noise "
        "schedule (generate --scheduler picks another)",
        path,
        raw.get("_class_name"),
        sorted(DIFFUSERS_CLASSES),
        FALLBACK_KIND,
    )
    return SchedulerConfig.from_diffusers(raw, kind=FALLBACK_KIND)


def _weights(folder: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Path]:
    for name in WEIGHT_NAMES + (PICKLE_NAMES if allow_pickle else ()):
        if (folder / name).is_file():
            return load_weights(folder / name, allow_pickle=allow_pickle), folder / name
    pickled = [n for n in PICKLE_NAMES if (folder / n).is_file()]
    if pickled:
        load_weights(folder / pickled[0], allow_pickle=False)  # raises the explanatory error
    raise ConfigError(
        f"{folder} has none of {list(WEIGHT_NAMES)} (half-precision variants such as *.fp16.safetensors are "
        "not read: save the pipeline in float32)"
    )


def _text_config(cfg: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """transformers' CLIPTextConfig -> the clip family's TextConfig JSON."""
    if cfg.get("architectures", ["CLIPTextModel"]) != ["CLIPTextModel"]:
        raise UnsupportedError(
            f"text_encoder is {cfg.get('architectures')}; only CLIPTextModel (Stable Diffusion 1.x/2.x) is supported"
        )
    return {
        "vocab_size": cfg.get("vocab_size", 49408),
        "context_length": cfg.get("max_position_embeddings", 77),
        "width": cfg.get("hidden_size", 512),
        "layers": cfg.get("num_hidden_layers", 12),
        "heads": cfg.get("num_attention_heads", 8),
        "mlp_dim": cfg.get("intermediate_size", 2048),
        "act": cfg.get("hidden_act", "quick_gelu"),
        "eos_token_id": cfg.get("eos_token_id", 49407),
        "pad_token_id": pad_id,
    }


def _tokenizer(folder: Path) -> tuple[str, int]:
    """(tokenizer JSON, pad id) of the pipeline's tokenizer folder. A folder holding only the slow
    tokenizer's vocab.json and merges.txt (as Stable Diffusion 1.5 ships it) is converted with
    transformers, which must then be installed."""
    from tokenizers import Tokenizer

    settings = (
        read_json_object(folder / "tokenizer_config.json")
        if (folder / "tokenizer_config.json").is_file()
        else {}
    )
    if (folder / "tokenizer.json").is_file():
        text = (folder / "tokenizer.json").read_text()
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        transformers = require("transformers", "dev")
        text = transformers.CLIPTokenizerFast.from_pretrained(str(folder)).backend_tokenizer.to_str()
    else:
        raise ConfigError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt")
    pad = settings.get("pad_token", "<|endoftext|>")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    pad_id = Tokenizer.from_str(text).token_to_id(str(pad))
    if pad_id is None:
        raise ConfigError(f"{folder}: the pad token {pad!r} is not in the tokenizer's vocabulary")
    return text, pad_id


def load_directory(root: Path, allow_pickle: bool = False) -> DiffusersSource:
    """Read a StableDiffusionPipeline directory into the family's config JSON and state dict."""
    index = read_json_object(root / "model_index.json")
    if index.get("_class_name") not in PIPELINES:
        raise UnsupportedError(
            f"{root}: pipeline {index.get('_class_name')!r} is not supported; accepted: {PIPELINES}"
        )
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (root / part).is_dir():
            raise ConfigError(f"{root} has no {part}/ folder; a {index['_class_name']} directory needs one")
    skipped = [k for k in ("safety_checker", "feature_extractor") if (index.get(k) or [None])[0] is not None]
    if skipped:
        log.warning("%s: %s not carried into the package (the runtime has no safety checker)", root, skipped)
    tokenizer_json, pad_id = _tokenizer(root / "tokenizer")
    scheduler = _scheduler(root / "scheduler" / "scheduler_config.json")
    has_vae = (root / "vae").is_dir()
    config = {
        "text": _text_config(read_json_object(root / "text_encoder" / "config.json"), pad_id),
        "unet": read_json_object(root / "unet" / "config.json"),
        "vae": read_json_object(root / "vae" / "config.json") if has_vae else None,
        "scheduler": scheduler.to_dict(),
        "extra": {
            "pipeline": index["_class_name"],
            "scheduler": read_json_object(root / "scheduler" / "scheduler_config.json").get("_class_name"),
        },
    }
    state: dict[str, torch.Tensor] = {}
    files = []
    for part, prefix, strip in (
        ("text_encoder", "text_encoder.", "text_model."),
        ("unet", "unet.", ""),
        ("vae", "vae.", ""),
    ):
        if part == "vae" and not has_vae:
            continue
        weights, path = _weights(root / part, allow_pickle)
        files.append(path)
        for key, value in weights.items():
            if key.endswith("position_ids"):
                continue  # a buffer older transformers saved; ours is computed
            # transformers before 5 saves CLIPTextModel's tensors under "text_model.", 5 without it
            name = key[len(strip) :] if strip and key.startswith(strip) else key
            state[prefix + name] = value
    return DiffusersSource(config, state, tokenizer_json, tuple(files))


def check_tokenizer_length(tokenizer_json: str, context_length: int) -> None:
    """The package pads every prompt to the text encoder's context; a tokenizer whose truncation
    is set shorter or longer would disagree with it."""
    truncation = json.loads(tokenizer_json).get("truncation") or {}
    length = truncation.get("max_length")
    if length is not None and length != context_length:
        raise ConfigError(
            f"the tokenizer truncates at {length} tokens, the text encoder's context is {context_length}"
        )


DIFFUSERS = DiffusersSupport(pipelines=PIPELINES, load=load_directory)
