"""Family registry: each family's config, model, components and manifest sections, as data."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from torch import nn

from mmedge.errors import ConfigError, ModelNotFoundError
from mmedge.models.component import ComponentDecl


@dataclass(frozen=True)
class Family:
    name: str
    task: str
    parse_config: Callable[[dict[str, Any]], Any]
    build: Callable[[Any], nn.Module]
    components: Callable[[Any], tuple[ComponentDecl, ...]]
    preprocess: Callable[[Any], dict[str, Any]]  # manifest "preprocess" section
    tokenizer: Callable[[Any], dict[str, Any]]  # manifest "tokenizer" section (without "file")
    generation: Callable[[Any], dict[str, Any]]  # manifest "generation" section


def _clip() -> Family:
    from mmedge.models import clip

    return Family(
        name="clip",
        task="retrieval",
        parse_config=clip.CLIPConfig.from_dict,
        build=clip.CLIP,
        components=clip.components,
        preprocess=lambda c: {
            "image_size": c.vision.image_size,
            "mean": list(clip.CLIP_MEAN),
            "std": list(clip.CLIP_STD),
            "resize": "shortest",
            "crop": "center",
            "rescale": 1 / 255,
        },
        tokenizer=lambda c: {
            "context_length": c.text.context_length,
            "pad_id": c.text.pad_token_id,
            "eos_id": c.text.eos_token_id,
        },
        generation=lambda c: {"prompt_templates": ["a photo of {}.", "a picture of {}.", "{}"]},
    )


def _causal_lm() -> Family:
    from mmedge.models import decoder

    return Family(
        name="causal-lm",
        task="generation",
        parse_config=decoder.DecoderConfig.from_dict,
        build=decoder.DecoderLM,
        components=decoder.components,
        preprocess=lambda c: {},
        tokenizer=lambda c: {
            "context_length": c.max_context,
            "pad_id": c.pad_token_id,
            "eos_id": c.eos_token_id,
        },
        generation=decoder.generation_section,
    )


def _blip2() -> Family:
    from mmedge.models import blip2

    return Family(
        name="blip2",
        task="chat",
        parse_config=blip2.Blip2Config.from_dict,
        build=blip2.Blip2,
        components=blip2.components,
        preprocess=blip2.preprocess_section,
        tokenizer=lambda c: {
            "context_length": c.text.max_context,
            "pad_id": c.text.pad_token_id,
            "eos_id": c.text.eos_token_id,
        },
        generation=blip2.generation_section,
    )


_FACTORIES: dict[str, Callable[[], Family]] = {"clip": _clip, "causal-lm": _causal_lm, "blip2": _blip2}


def get_family(name: str) -> Family:
    """Return a family by name, or raise listing the known ones."""
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise ConfigError(f"unknown family {name!r}; known: {sorted(_FACTORIES)}") from None


def list_presets() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("mmedge.models.presets").iterdir() if p.name.endswith(".json")
    )


def load_preset(name: str) -> tuple[Family, dict[str, Any]]:
    """Return (family, config dict) of a named preset."""
    if name not in list_presets():
        raise ModelNotFoundError(f"no preset {name!r}; presets: {list_presets()}")
    raw = json.loads(resources.files("mmedge.models.presets").joinpath(f"{name}.json").read_text())
    return get_family(raw["family"]), raw["config"]
