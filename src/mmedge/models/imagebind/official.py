"""State dicts in the official ImageBind layout (facebookresearch/ImageBind) -> the imagebind family's.

The released `imagebind_huge.pth` is `ImageBindModel.state_dict()`: per modality (`vision`, `text`,
`audio`, `depth`, `thermal`, `imu`)

- `modality_preprocessors.<m>.*`: `cls_token`, the stem (`rgbt_stem` for vision, audio and thermal,
  `depth_stem`, `imu_stem`: `proj` (vision: `proj.1`, after PadIm2Video) and `norm_layer`) and the
  positions (`pos_embedding_helper.pos_embed`; IMU and text: `pos_embed`); text's `token_embedding`
  and its causal `mask` buffer (derived from the context length: dropped);
- `modality_trunks.<m>.*`: `pre_transformer_layer.0` (vision's LayerNorm) and `blocks.<i>.*`
  (`attn.in_proj_weight/bias`, `attn.out_proj`, `attn.bias_k/bias_v`, `norm_1`, `mlp.fc1/fc2`, `norm_2`);
- `modality_heads.<m>.*`: LayerNorm `0` and Linear `2` (IMU: `3`, after a Dropout; text: `proj.0`, `proj.1`);
- `modality_postprocessors.<m>.1.log_logit_scale`: text's learned scale, the others' fixed buffer.

Every name is renamed; any other is refused (a `ConfigError`), and `checkpoint.assign_weights`
refuses a file that lacks one the config needs, so a file of another model is not half-loaded.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mmedge.models.checkpoint import renamed_state
from mmedge.models.imagebind.config import MODALITIES

_NAME = re.compile(
    r"modality_(preprocessors|trunks|heads|postprocessors)\.(" + "|".join(MODALITIES) + r")\.(.+)"
)
_DERIVED = frozenset({"modality_preprocessors.text.mask"})  # the causal mask buffer

_STEM = {
    "vision": "rgbt_stem",
    "audio": "rgbt_stem",
    "thermal": "rgbt_stem",
    "depth": "depth_stem",
    "imu": "imu_stem",
}
_HEAD_PROJ = {"imu": "3", "text": "proj.1"}  # else "2"
_HEAD_NORM = {"text": "proj.0"}  # else "0"

_TRUNK = (
    (re.compile(r"pre_transformer_layer\.0\.(weight|bias)"), r"pre_layernorm.\1"),
    (re.compile(r"blocks\.(\d+)\.attn\.in_proj_(weight|bias)"), r"encoder.layers.\1.self_attn.qkv.\2"),
    (
        re.compile(r"blocks\.(\d+)\.attn\.out_proj\.(weight|bias)"),
        r"encoder.layers.\1.self_attn.projection.\2",
    ),
    (re.compile(r"blocks\.(\d+)\.attn\.(bias_k|bias_v)"), r"encoder.layers.\1.self_attn.\2"),
    (re.compile(r"blocks\.(\d+)\.norm_1\.(weight|bias)"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"blocks\.(\d+)\.norm_2\.(weight|bias)"), r"encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)"), r"encoder.layers.\1.mlp.\2.\3"),
)


def _preprocessor(m: str, rest: str) -> str | None:
    if m == "text":
        return {"token_embedding.weight": "token_embedding.weight", "pos_embed": "position_embedding"}.get(
            rest
        )
    stem = _STEM[m]
    table = {
        "cls_token": "class_embedding",
        "pos_embed" if m == "imu" else "pos_embedding_helper.pos_embed": "position_embedding",
        f"{stem}.proj.1.weight" if m == "vision" else f"{stem}.proj.weight": "patch_embedding.weight",
    }
    if m != "vision":
        table.update({f"{stem}.norm_layer.{p}": f"patch_norm.{p}" for p in ("weight", "bias")})
    return table.get(rest)


def _rename(name: str) -> str | None:
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    part, m, rest = match.groups()
    if part == "preprocessors":
        new = _preprocessor(m, rest)
        return None if new is None else f"{m}.embeddings.{new}"
    if part == "trunks":
        for pattern, repl in _TRUNK:
            if pattern.fullmatch(rest):
                return f"{m}." + pattern.sub(repl, rest)
        return None
    if part == "heads":
        norm, proj = _HEAD_NORM.get(m, "0"), _HEAD_PROJ.get(m, "2")
        table = {
            f"{norm}.weight": "head_norm.weight",
            f"{norm}.bias": "head_norm.bias",
            f"{proj}.weight": "projection.weight",
        }
        return f"{m}.{table[rest]}" if rest in table else None
    return f"{m}.log_logit_scale" if rest == "1.log_logit_scale" and m != "vision" else None


def from_official(state: dict[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """An official ImageBind state dict -> the imagebind family's names; the text mask buffer is
    dropped and unknown names refused (`ConfigError`). The modalities present must be the config's
    (a missing or extra modality is refused when the weights are assigned)."""
    return renamed_state(
        state,
        _rename,
        lambda name: name in _DERIVED,
        source,
        "ImageBind's layout (modality_preprocessors.*, modality_trunks.*, modality_heads.*, "
        f"modality_postprocessors.* of {list(MODALITIES)})",
    )
