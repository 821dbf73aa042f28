"""Weights for the shared encoder: the official release, or a trained CLIP checkpoint's vision trunk.

Official (invictus717/MetaTransformer, `Meta-Transformer_{base_patch16,large_patch14}_encoder.pth`):
the state dict of a bare `nn.Sequential` of timm `Block`s, which the README loads with
strict=True: `<i>.norm1.{weight,bias}`, `<i>.attn.qkv.{weight,bias}`, `<i>.attn.proj.{weight,bias}`,
`<i>.norm2.{weight,bias}`, `<i>.mlp.fc1.{weight,bias}`, `<i>.mlp.fc2.{weight,bias}` for every
block. The Blocks use `nn.LayerNorm` (eps 1e-5) and `nn.GELU` (erf), and there is no norm before or
after them. Every one of those names must be there and no other (`ConfigError`); sizes are checked
against the config.

CLIP (the clip family's checkpoints, Hugging Face's CLIP names): `vision_model.encoder.layers.<i>.*`
with separate q/k/v projections, concatenated here into one qkv in (q, k, v) order, `out_proj` ->
`projection`, and `vision_model.pre_layrnorm` -> the encoder's `pre_layrnorm`. The patch and position
embeddings, `post_layernorm` and the projections are not part of the trunk and are left out.
Activation, LayerNorm eps and every size must equal the CLIP config's (quick_gelu and gelu differ).

Files: safetensors, or a pickle-based file with `allow_pickle`, read with `weights_only=True`
(`checkpoint.load_weights`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mmedge.errors import ConfigError
from mmedge.models.meta_transformer.config import EncoderConfig
from mmedge.models.meta_transformer.modeling import MetaTransformer

# Official leaf names of one block -> ours, under `encoder.layers.<i>.`
_OFFICIAL_BLOCK = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.qkv.bias": "self_attn.qkv.bias",
    "attn.proj.weight": "self_attn.projection.weight",
    "attn.proj.bias": "self_attn.projection.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_OFFICIAL_NAME = re.compile(r"(\d+)\.(.+)")
OFFICIAL_ACT, OFFICIAL_EPS = "gelu", 1e-5


def _check_state(state: Any, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise ConfigError(f"{source}: expected a state dict, got {type(state).__name__}")
    bad = [repr(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{source}: entries that are not named tensors: {bad[:5]}")
    return state


def from_official(
    state: Any, cfg: EncoderConfig, source: str = "official encoder"
) -> dict[str, torch.Tensor]:
    """The official bare-blocks state dict -> the model's `encoder.*` names; unknown or missing
    names, and a config the released blocks do not compute (act, eps, pre_norm), are ConfigErrors."""
    state = _check_state(state, source)
    if (cfg.act, cfg.eps, cfg.pre_norm) != (OFFICIAL_ACT, OFFICIAL_EPS, False):
        raise ConfigError(
            f"{source}: the official encoder's blocks use act={OFFICIAL_ACT!r}, LayerNorm eps {OFFICIAL_EPS} and no "
            f"input norm; the config has act={cfg.act!r}, eps={cfg.eps}, pre_norm={cfg.pre_norm}"
        )
    out, unknown = {}, []
    for name, tensor in state.items():
        m = _OFFICIAL_NAME.fullmatch(name)
        if m is None or m[2] not in _OFFICIAL_BLOCK or int(m[1]) >= cfg.layers or m[1] != str(int(m[1])):
            unknown.append(name)
            continue
        out[f"encoder.layers.{int(m[1])}.{_OFFICIAL_BLOCK[m[2]]}"] = tensor
    expected = {f"{i}.{leaf}" for i in range(cfg.layers) for leaf in _OFFICIAL_BLOCK}
    missing = sorted(expected - set(state), key=_natural)
    if unknown or missing:
        raise ConfigError(
            f"{source}: not the official encoder of {cfg.layers} blocks: unexpected {sorted(unknown, key=_natural)[:6]}"
            f" ({len(unknown)} in all), missing {missing[:6]} ({len(missing)} in all); each block holds "
            f"{sorted(_OFFICIAL_BLOCK)}"
        )
    return out


def from_clip(
    state: Any, clip_config: dict[str, Any], cfg: EncoderConfig, source: str = "clip checkpoint"
) -> dict[str, torch.Tensor]:
    """A clip-family (HF CLIP names) state dict and its config JSON -> the model's `encoder.*` names.

    Only `vision_model.encoder.*` and `vision_model.pre_layrnorm.*` are read; the rest of the
    vision tower and the text tower are left out. Sizes, activation and eps must match."""
    state = _check_state(state, source)
    vision = clip_config.get("vision") or {}
    theirs = {
        "width": vision.get("width"),
        "layers": vision.get("layers"),
        "heads": vision.get("heads"),
        "mlp_dim": vision.get("mlp_dim"),
        "act": vision.get("act"),
        "eps": clip_config.get("layer_norm_eps", 1e-5),
        "pre_norm": True,
    }
    ours = {k: getattr(cfg, k) for k in theirs}
    if ours != theirs:
        diff = {k: (ours[k], theirs[k]) for k in theirs if ours[k] != theirs[k]}
        raise ConfigError(
            f"{source}: the encoder config does not compute CLIP's vision trunk; (ours, CLIP's): {diff}"
            + ("; CLIP normalises the trunk's input: set encoder.pre_norm" if "pre_norm" in diff else "")
        )
    prefix = "vision_model.encoder.layers."
    out: dict[str, torch.Tensor] = {}
    unknown, qkv = [], {}
    for name, tensor in state.items():
        if name.startswith("vision_model.pre_layrnorm.") and name.rsplit(".", 1)[1] in ("weight", "bias"):
            out["encoder.pre_layrnorm." + name.rsplit(".", 1)[1]] = tensor
            continue
        if not name.startswith(prefix):
            if name.startswith("vision_model.encoder."):
                unknown.append(name)
            continue  # embeddings, post_layernorm, projections, the text tower: not the trunk
        m = re.fullmatch(
            r"(\d+)\.(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2|self_attn\.(?:q|k|v|out)_proj)\.(weight|bias)",
            name[len(prefix) :],
        )
        if m is None or int(m[1]) >= cfg.layers:
            unknown.append(name)
            continue
        i, module, leaf = int(m[1]), m[2], m[3]
        if module.startswith("self_attn.") and module != "self_attn.out_proj":
            qkv[(i, module[len("self_attn.")], leaf)] = tensor
            continue
        module = "self_attn.projection" if module == "self_attn.out_proj" else module
        out[f"encoder.layers.{i}.{module}.{leaf}"] = tensor
    for i in range(cfg.layers):
        for leaf in ("weight", "bias"):
            parts = [qkv.get((i, p, leaf)) for p in ("q", "k", "v")]
            if all(p is not None for p in parts):
                out[f"encoder.layers.{i}.self_attn.qkv.{leaf}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    if unknown:
        raise ConfigError(f"{source}: names that are not part of CLIP's vision trunk: {sorted(unknown)[:6]}")
    return out


def assign_encoder(model: MetaTransformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `encoder.*` weights strictly: every encoder name present, no others, shapes as configured."""
    from mmedge.models.checkpoint import assign_weights

    if any(not k.startswith("encoder.") for k in state):
        raise ConfigError(f"{source}: only encoder.* weights load here")
    assign_weights(model.encoder, {k[len("encoder.") :]: v for k, v in state.items()}, source)


def load_official_encoder(model: MetaTransformer, path: str | Path, allow_pickle: bool = False) -> None:
    """Load the official encoder file (`Meta-Transformer_base_patch16_encoder.pth`, pickle-based:
    `allow_pickle`, read with weights_only=True; or the same state dict as safetensors) into `model`.
    The name must end in .pth (or .safetensors): the OpenXLab mirror serves it without a suffix."""
    from mmedge.models.checkpoint import load_weights

    state = load_weights(path, allow_pickle=allow_pickle)
    assign_encoder(model, from_official(state, model.cfg.encoder, str(path)), str(path))


def load_clip_encoder(model: MetaTransformer, checkpoint: str | Path) -> None:
    """Load the vision trunk of a clip-family mmedge checkpoint (e.g. the demo's clip-tiny) into
    `model`'s shared encoder; only the tower's tensors are read from the safetensors file."""
    from mmedge.models.checkpoint import WEIGHTS_NAME, load_weights, read_checkpoint_meta

    root = Path(checkpoint)
    meta = read_checkpoint_meta(root)
    if meta.get("family") != "clip":
        raise ConfigError(
            f"{root} is a {meta.get('family')!r} checkpoint; the encoder is taken from a 'clip' one"
        )
    state = load_weights(
        root / WEIGHTS_NAME, prefixes=("vision_model.encoder.", "vision_model.pre_layrnorm.")
    )
    assign_encoder(model, from_clip(state, meta["config"], model.cfg.encoder, str(root)), str(root))


def _natural(name: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
