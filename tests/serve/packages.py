"""Tiny random-weight packages for the server tests: a CLIP (retrieval) and a BLIP-2 (chat)."""

from __future__ import annotations

from pathlib import Path

VISION = {
    "image_size": 32,
    "patch_size": 16,
    "width": 32,
    "layers": 1,
    "heads": 2,
    "mlp_dim": 64,
    "act": "gelu",
}
CLIP = {
    "vision": VISION,
    "text": {
        "vocab_size": 0,
        "context_length": 16,
        "width": 32,
        "layers": 1,
        "heads": 2,
        "mlp_dim": 64,
        "act": "gelu",
        "eos_token_id": 3,
        "pad_token_id": 0,
    },
    "projection_dim": 32,
}
BLIP2 = {
    "vision": {"tower": "clip", **VISION, "eps": 1e-5},
    "qformer": {
        "hidden": 32,
        "layers": 1,
        "heads": 2,
        "intermediate": 64,
        "cross_attention_frequency": 1,
        "encoder_hidden": 32,
        "num_query_tokens": 4,
    },
    "text": {
        "variant": "opt",
        "vocab_size": 0,
        "hidden": 32,
        "layers": 2,
        "heads": 2,
        "ffn_dim": 64,
        "max_positions": 96,
        "max_context": 80,
        "bos_token_id": 1,
        "eos_token_id": 3,
        "pad_token_id": 0,
    },
    "resize": "shortest",
}


def make_package(family: str, raw: dict, root: Path, name: str, seed: int = 0) -> Path:
    """init (random weights) -> export: an fp32 package named `name`."""
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_model
    from mmedge.models.registry import get_family

    ckpt = init_model(get_family(family), raw, root / f"{name}-ckpt", seed=seed)
    export_model(ckpt, root / name, name=name)
    return root / name
