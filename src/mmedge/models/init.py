"""Random-weight checkpoints of a preset, for benchmarks where speed does not depend on weights."""

from __future__ import annotations

from pathlib import Path

import torch

from mmedge.models.checkpoint import save_checkpoint
from mmedge.models.families import load_preset


def init_checkpoint(preset: str, out: str | Path, seed: int = 0) -> Path:
    """Write an mmedge checkpoint with random weights and a small trained tokenizer."""
    import numpy as np

    from mmedge.data import TRAIN_SEED, caption_for, generate_scenes
    from mmedge.data.tokenizer_train import train_tokenizer

    family, raw = load_preset(preset)
    rng = np.random.default_rng(seed)
    scenes = generate_scenes(500, TRAIN_SEED)
    generative = family.task == "chat"
    texts = [caption_for(s.objects, rng) for s in scenes]
    if generative:  # an LM tokenizer that also knows the question/answer texts
        texts += [f"Question: {qa.question} Answer: {qa.answer}" for s in scenes for qa in s.qa]
    tok = train_tokenizer(texts, vocab_size=320 if generative else 256, generation=generative)
    for part in ("text", "qformer"):  # presets sized by their tokenizer
        if part in raw and raw[part].get("vocab_size") == 0:
            raw = {**raw, part: {**raw[part], "vocab_size": tok.get_vocab_size()}}
    cfg = family.parse_config(raw)
    torch.manual_seed(seed)
    model = family.build(cfg).eval()
    return save_checkpoint(
        out, family.name, cfg.to_dict(), model, tok.to_str(), extra={"init": {"preset": preset, "seed": seed}}
    )
