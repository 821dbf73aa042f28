"""HF `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` directories -> llava config and weights.

Weights come in two spellings: older files nest the tower as `vision_tower.vision_model.*` and the LM
as `language_model.model.*` + `language_model.lm_head.*`; transformers 5 models hold
`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*` and `lm_head.*`.
Both are mapped onto the family's names. The chat template and the image placeholder come from the
processor files (`chat_template.jinja`, `chat_template.json`, `processor_config.json`,
`tokenizer_config.json`), and LLaVA-1.5's pad-to-square from the image processor's `do_pad`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models import decoder
from mmedge.models.checkpoint import read_json_object
from mmedge.models.clip.hf import clip_vision_config
from mmedge.models.llava.modeling import LlavaConfig

_MAX_TEMPLATE_CHARS = 1 << 16


def llava_config(cfg: dict[str, Any], max_context: int | None = None) -> dict[str, Any]:
    """HF LlavaConfig / LlavaNextConfig -> LlavaConfig JSON; refuses what the modules do not model."""
    v, t = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise UnsupportedError(f"a {v.get('model_type')!r} vision tower is not supported; CLIP's is")
    next_ = cfg.get("model_type") == "llava_next"
    layers = cfg.get("vision_feature_layer", -2)
    pinpoints = cfg.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672]]
    if max_context is None:  # room for one image's tokens and a conversation about it
        max_context = min(
            t.get("max_position_embeddings", 2048), _image_tokens_bound(v, next_, pinpoints) + 1024
        )
    out: dict[str, Any] = {
        "vision": {**clip_vision_config(v), "eps": v.get("layer_norm_eps", 1e-5)},
        "text": decoder.hf_decoder_config({"model_type": "llama", **t}, max_context),
        "variant": "next" if next_ else "1.5",
        "feature_layers": [layers] if isinstance(layers, int) else list(layers),
        "select_strategy": cfg.get("vision_feature_select_strategy", "default"),
        "projector_act": cfg.get("projector_hidden_act", "gelu"),
        "projector_bias": cfg.get("multimodal_projector_bias", True),
    }
    if next_:
        out["grid_pinpoints"] = pinpoints
        if cfg.get("vision_aspect_ratio", "anyres") not in ("anyres",):
            raise UnsupportedError(f"vision_aspect_ratio {cfg.get('vision_aspect_ratio')!r} is not supported")
    return out


def _image_tokens_bound(vision: dict[str, Any], next_: bool, pinpoints: list[list[int]]) -> int:
    """The most LM positions one image can take (NeXT: base image, largest grid, a newline per row)."""
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 32)
    side = size // patch
    if not next_:
        return side * side + 1
    rows = max(h for h, _ in pinpoints) // size * side
    cols = max(w for _, w in pinpoints) // size * side
    return side * side + 1 + rows * (cols + 1)


def llava_directory(root: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The settings an HF directory keeps beside config.json: chat template, image placeholder, do_pad."""
    from mmedge.models.hf_import import image_processor_settings

    out = dict(config)
    _, image = image_processor_settings(root)
    if config.get("variant") != "next" and image.get("do_pad"):
        out["pad_square"] = True  # LLaVA-1.5's expand2square (for NeXT, do_pad pads batches of tiles)
    processor = _optional_json(root / "processor_config.json")
    token = processor.get("image_token") or _optional_json(root / "tokenizer_config.json").get("image_token")
    if token is not None:
        out["image_token"] = token
    template = _chat_template(root)
    if template is not None:
        out["chat_template"] = template
    return out


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _chat_template(root: Path) -> str | None:
    """The processor's chat template (or the tokenizer's), in the places transformers saves it."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        found: Any = jinja.read_text(encoding="utf-8")
    else:
        found = None
        for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
            found = _optional_json(root / name).get("chat_template")
            if found is not None:
                break
    if found is None:
        return None
    if isinstance(found, list):  # named templates: [{"name": "default", "template": ...}, ...]
        by_name = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        found = by_name.get("default")
    if not isinstance(found, str) or not found or len(found) > _MAX_TEMPLATE_CHARS:
        raise ConfigError(
            f"{root}: the chat template must be a non-empty string of at most {_MAX_TEMPLATE_CHARS} characters"
        )
    return found


_PREFIXES = (  # (saved prefix, the family's prefix), first match wins
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def llava_weights(state: dict[str, torch.Tensor], cfg: LlavaConfig) -> dict[str, torch.Tensor]:
    """Either spelling -> the family's names; the LM head gets its copy when tied."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for old, new in _PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    decoder.tie_lm_head(out, cfg.text, "language_model.")
    return out
