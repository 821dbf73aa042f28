"""Random-weight checkpoints, for benchmarks and conformance tests where speed does not depend on weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmedge.models.checkpoint import save_checkpoint
from mmedge.models.registry import Family, load_preset


def tiny_tokenizer_json(generative: bool, seed: int = 0) -> str:
    """A small BPE tokenizer trained on synthetic scene texts: captions, and for a generating
    model also the question/answer texts (an LM tokenizer that adds only BOS)."""
    import numpy as np

    from mmedge.data import TRAIN_SEED, caption_for, generate_scenes
    from mmedge.data.tokenizer_train import train_tokenizer

    rng = np.random.default_rng(seed)
    scenes = generate_scenes(500, TRAIN_SEED)
    texts = [caption_for(s.objects, rng) for s in scenes]
    if generative:
        texts += [f"Question: {qa.question} Answer: {qa.answer}" for s in scenes for qa in s.qa]
    tok = train_tokenizer(texts, vocab_size=320 if generative else 256, generation=generative)
    return str(tok.to_str())


def _fill_vocab(raw: Any, size: int) -> Any:
    """Every `"vocab_size": 0` in a config means "the tokenizer's size"."""
    if isinstance(raw, dict):
        return {k: size if k == "vocab_size" and v == 0 else _fill_vocab(v, size) for k, v in raw.items()}
    return raw


def init_model(
    family: Family, raw: dict[str, Any], out: str | Path, seed: int = 0, extra: dict[str, Any] | None = None
) -> Path:
    """Write an mmedge checkpoint of `family` with config `raw` (JSON form) and random weights."""
    from tokenizers import AddedToken, Tokenizer

    from mmedge.models.component import reads_instruction

    tok = Tokenizer.from_str(tiny_tokenizer_json(generative=family.task != "retrieval", seed=seed))
    # The family's prompt tokens depend on its config; the config's vocab size on the tokenizer.
    provisional = family.config_from_dict(_fill_vocab(raw, tok.get_vocab_size() + 64))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in family.special_tokens(provisional)]
    )
    tokenizer_json = tok.to_str()
    cfg = family.config_from_dict(_fill_vocab(raw, tok.get_vocab_size()))
    torch.manual_seed(seed)
    model = family.build(cfg).eval()
    # An image path that reads an instruction tokenises it with the same tiny tokenizer here.
    instruction = tokenizer_json if reads_instruction(family.components(cfg)) else None
    return save_checkpoint(
        out,
        family.name,
        cfg.to_dict(),
        model,
        tokenizer_json,
        extra=extra,
        instruction_tokenizer_json=instruction,
    )


def init_checkpoint(preset: str, out: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Write an mmedge checkpoint of a named preset with random weights and a small trained tokenizer
    (a folder holding anything but an older checkpoint is refused unless `force`)."""
    from mmedge.models.checkpoint import is_checkpoint
    from mmedge.runtime.staging import check_replaceable

    check_replaceable(out, is_checkpoint, "checkpoint", force)
    family, raw = load_preset(preset)
    return init_model(family, raw, out, seed, extra={"init": {"preset": preset, "seed": seed}})
