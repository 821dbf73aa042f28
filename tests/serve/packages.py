"""Tiny random-weight packages for the server tests: a CLIP (retrieval) and a BLIP-2 (chat)."""

from __future__ import annotations

from pathlib import Path

from families.family_conformance import CASES

CLIP = CASES[("clip", "vit")]
# The conformance BLIP-2 (OPT) with room for a conversation: 4 image tokens and several turns.
BLIP2 = {
    **CASES[("blip2", "opt")],
    "text": {**CASES[("blip2", "opt")]["text"], "max_positions": 96, "max_context": 80},
}


def make_package(family: str, raw: dict, root: Path, name: str, seed: int = 0) -> Path:
    """init (random weights) -> export: an fp32 package named `name`."""
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_model
    from mmedge.models.registry import get_family

    ckpt = init_model(get_family(family), raw, root / f"{name}-ckpt", seed=seed)
    export_model(ckpt, root / name, name=name)
    return root / name
