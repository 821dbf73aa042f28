"""An ImageBind model's vision and text encoders from a trained clip-family model.

ImageBind starts from a CLIP (OpenCLIP ViT-H) and keeps its image and text encoders frozen while the
other modalities learn to meet them; `imagebind-tiny` starts from the demo's clip-tiny the same way.
The two architectures compute the same functions under other names: CLIP's q/k/v projections are
the packed q|k|v, `pre_layrnorm` the vision pre-norm, `post_layernorm` / `final_layer_norm` the head
norms, the projections the heads' Linears; the Conv2d patch stem becomes the 2-frame Conv3d with
half the kernel in each frame (both frames are the image), and CLIP's learned temperature the text
postprocessor's log scale.
"""

from __future__ import annotations

from typing import Any

import torch

from mmedge.errors import ConfigError
from mmedge.models.imagebind.config import ImageBindConfig
from mmedge.models.imagebind.modeling import ImageBind


def check_clip_fits(cfg: ImageBindConfig, clip_cfg: Any) -> None:
    """Refuse a clip config whose towers this ImageBind config cannot hold exactly."""
    v, t, cv, ct = cfg.vision, cfg.text, clip_cfg.vision, clip_cfg.text
    pairs = {
        "vision image_size": (v.image_size, cv.image_size),
        "vision patch_size": (v.patch_size, cv.patch_size),
        "vision width": (v.width, cv.width),
        "vision layers": (v.layers, cv.layers),
        "vision heads": (v.heads, cv.heads),
        "vision mlp": (4 * v.width, cv.mlp_dim),
        "text width": (t.width, ct.width),
        "text layers": (t.layers, ct.layers),
        "text heads": (t.heads, ct.heads),
        "text mlp": (4 * t.width, ct.mlp_dim),
        "text context_length": (t.context_length, ct.context_length),
        "text vocab_size": (t.vocab_size, ct.vocab_size),
        "text eos_token_id": (t.eos_token_id, ct.eos_token_id),
        "embed_dim": (cfg.embed_dim, clip_cfg.projection_dim),
        "eps": (cfg.eps, clip_cfg.layer_norm_eps),
        "vision act": ("gelu", cv.act),
        "text act": ("gelu", ct.act),
    }
    wrong = {k: f"imagebind {a} vs clip {b}" for k, (a, b) in pairs.items() if a != b}
    if wrong:
        raise ConfigError(f"the clip checkpoint does not fit this imagebind config: {wrong}")


def _trunk(prefix: str, layers: int, clip: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    for i in range(layers):
        src, dst = f"{prefix}.encoder.layers.{i}", f"encoder.layers.{i}"
        qkv = (
            [clip[f"{src}.self_attn.{p}_proj.weight"] for p in "qkv"],
            [clip[f"{src}.self_attn.{p}_proj.bias"] for p in "qkv"],
        )
        out[dst + ".self_attn.qkv.weight"] = torch.cat(qkv[0])
        out[dst + ".self_attn.qkv.bias"] = torch.cat(qkv[1])
        for ours, theirs in (
            ("self_attn.projection", "self_attn.out_proj"),
            ("layer_norm1", "layer_norm1"),
            ("layer_norm2", "layer_norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            for kind in ("weight", "bias"):
                out[f"{dst}.{ours}.{kind}"] = clip[f"{src}.{theirs}.{kind}"]


def load_clip_towers(model: ImageBind, clip_model: torch.nn.Module) -> None:
    """Copy `clip_model`'s vision and text towers into `model.vision` and `model.text` in place."""
    check_clip_fits(model.cfg, clip_model.cfg)
    sd = clip_model.state_dict()
    vision: dict[str, torch.Tensor] = {}
    _trunk("vision_model", model.cfg.vision.layers, sd, vision)
    conv = sd["vision_model.embeddings.patch_embedding.weight"]  # (C, 3, p, p)
    vision.update(
        {
            "embeddings.patch_embedding.weight": torch.stack([conv / 2, conv / 2], dim=2),
            "embeddings.class_embedding": sd["vision_model.embeddings.class_embedding"][None, None],
            "embeddings.position_embedding": sd["vision_model.embeddings.position_embedding.weight"][None],
            "pre_layernorm.weight": sd["vision_model.pre_layrnorm.weight"],
            "pre_layernorm.bias": sd["vision_model.pre_layrnorm.bias"],
            "head_norm.weight": sd["vision_model.post_layernorm.weight"],
            "head_norm.bias": sd["vision_model.post_layernorm.bias"],
            "projection.weight": sd["visual_projection.weight"],
        }
    )
    text: dict[str, torch.Tensor] = {}
    _trunk("text_model", model.cfg.text.layers, sd, text)
    text.update(
        {
            "embeddings.token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
            "embeddings.position_embedding": sd["text_model.embeddings.position_embedding.weight"][None],
            "head_norm.weight": sd["text_model.final_layer_norm.weight"],
            "head_norm.bias": sd["text_model.final_layer_norm.bias"],
            "projection.weight": sd["text_projection.weight"],
            "log_logit_scale": sd["logit_scale"],
        }
    )
    for tower, weights in ((model.vision, vision), (model.text, text)):
        tower.load_state_dict(weights, strict=True)
