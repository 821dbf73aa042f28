"""Instruction-tune `instructblip-tiny` from a trained blip2-tiny, as InstructBLIP tunes BLIP-2.

The blip2 checkpoint's vision tower and LM stay frozen; its Q-Former (with the text embeddings and
text feed-forward that stage 1 trained), query tokens and projector are the starting point, and
learn with the frozen LM's loss. Each row is one image and one question: the question is the
Q-Former's instruction and also fills the LM's prompt template, so the queries can carry what that
question needs. Caption rows get the captioning prompt's text as their instruction, as the chat
pipeline gives it. Instructions are tokenised by the runtime's own `TextTokenizer` with the blip2
tokenizer (the Q-Former's vocabulary there), so training sees the ids a package will feed.

There is no slot loss here (blip2 stage 2's): it pins query i to slot i's token whatever the
question, and what the instruction buys is a prefix shaped by the question, e.g. for "what colour
is the circle?", where the 2-layer LM otherwise names another object's colour (docs/demo.md).
Steps are a fixed count (design: docs/demo.md; measurements: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmedge.data.scenes import TRAIN_SEED
from mmedge.errors import ConfigError
from mmedge.models.checkpoint import assign_weights, save_checkpoint
from mmedge.models.instructblip.modeling import InstructBlip, InstructBlipConfig
from mmedge.models.registry import load_preset
from mmedge.recipes.base import TrainRequest
from mmedge.recipes.blip2 import _encode, _prefix_loss
from mmedge.recipes.stages import encode_pool
from mmedge.recipes.trainer import TrainConfig, amx_bf16_fast
from mmedge.recipes.trainer import train as run_training

log = logging.getLogger(__name__)
# Which parts learn: InstructBLIP tunes the Q-Former and its projection; image encoder and LM stay frozen.
TRAINED = ("qformer", "qformer_text", "query_tokens", "language_projection")


@dataclass(frozen=True)
class InstructTrainSettings:
    blip2_checkpoint: str  # a trained blip2-tiny: frozen vision tower and LM, Q-Former to start from
    preset: str = "instructblip-tiny"
    steps: int = 1200
    batch_size: int = 64  # rows of one image and one question (or caption) each
    lr: float = 1e-3
    caption_fraction: float = 0.2  # the rest are questions
    pool: int = 8192  # at most this many scenes rendered and encoded once (never more than the run draws)
    budget_s: float | None = None  # cap by time instead (the schedule anneals by the deadline)
    instructed: bool = True  # False: the Q-Former reads the captioning instruction on every row (ablation)
    seed: int = 0
    threads: int = 0
    bf16: bool = True  # autocast where the CPU has AMX (`trainer.amx_bf16_fast`)


def instruct_config(preset: str, blip2_config: Any) -> InstructBlipConfig:
    """The preset's config, its vision tower and vocabulary sizes the blip2 checkpoint's (the
    weights are then loaded strictly: a checkpoint that does not fit the preset is refused)."""
    family, raw = load_preset(preset)
    done = blip2_config.to_dict()
    if not done["qformer"]["text"]:
        raise ConfigError(
            "the blip2 checkpoint's Q-Former has no text embeddings to read an instruction with "
            "(blip2-tiny's stage 1 trains them)"
        )
    raw = {
        **raw,
        "vision": done["vision"],
        "qformer": {
            **raw["qformer"],
            "vocab_size": done["qformer"]["vocab_size"],
            "encoder_hidden": done["qformer"]["encoder_hidden"],
        },
        "text": {**raw["text"], "vocab_size": done["text"]["vocab_size"]},
    }
    cfg: InstructBlipConfig = family.config_from_dict(raw)
    return cfg


def _pad(rows: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (B, L): padded instruction tokens are masked out of the
    queries' attention, so a row reads as it would alone."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def train_instructblip(
    out: str | Path, settings: InstructTrainSettings, progress: bool | None = None
) -> Path:
    """Instruction-tune the Q-Former and projector of `settings.blip2_checkpoint` on synthetic
    scene questions; writes an instructblip checkpoint whose instruction tokenizer is the blip2 one."""
    from tokenizers import Tokenizer

    from mmedge.data import caption_for, questions_for, sample_objects
    from mmedge.models.decoder import bos_marker
    from mmedge.models.sources import load_source
    from mmedge.runtime.sections import template_text
    from mmedge.runtime.texts import TextTokenizer

    t0 = time.perf_counter()
    src = load_source(settings.blip2_checkpoint)
    if src.family.name != "blip2":
        raise ConfigError(
            f"--init {settings.blip2_checkpoint!r} is a {src.family.name!r} model; "
            f"{settings.preset} starts from a trained blip2 checkpoint (e.g. $MMEDGE_HOME/checkpoints/blip2-tiny)"
        )
    family, _ = load_preset(settings.preset)
    cfg = instruct_config(settings.preset, src.config)
    model = InstructBlip(cfg)
    assign_weights(model, src.model.state_dict(), settings.blip2_checkpoint)
    model.requires_grad_(False)
    for name in TRAINED:
        getattr(model, name).requires_grad_(True)

    tok_json = src.tokenizer_json
    tok = Tokenizer.from_str(tok_json)
    q, text = cfg.qformer, cfg.text
    instructions = TextTokenizer.from_json(tok_json, q.max_text_positions, q.pad_token_id)

    @functools.cache  # a few dozen distinct questions
    def instruction_ids(instruction: str) -> tuple[int, ...]:
        return tuple(instructions.encode(instruction, allow_empty=True))  # as `image_sources` encodes it

    prompt = family.sections(cfg, model, tok_json).prompt
    assert prompt is not None  # a chat family always has one
    caption_instruction = template_text(prompt.caption or "")
    specials = (
        text.bos_token_id if bos_marker(tok_json, text.bos_token_id) else None,
        text.eos_token_id,
        text.pad_token_id,
    )
    context = text.max_context - q.num_query_tokens
    b = settings.batch_size
    rng = np.random.default_rng(np.random.SeedSequence(entropy=TRAIN_SEED, spawn_key=(settings.seed, 3)))
    pool = [sample_objects(rng) for _ in range(min(settings.pool, settings.steps * b))]
    pre = family.preprocess(cfg)
    assert pre is not None  # an image family always has one
    feats = encode_pool(model.image_features, pool, pre, rng)
    encoded_s = time.perf_counter() - t0

    def row(objs: tuple) -> tuple[str, list[tuple[str, str]]]:
        """(instruction, LM segments) of one caption or question row."""
        if rng.random() < settings.caption_fraction:
            return caption_instruction, [("", caption_for(objs, rng))]
        qa = questions_for(objs)
        pick = qa[int(rng.integers(len(qa)))]
        instruction = pick.question if settings.instructed else caption_instruction
        return instruction, [(cfg.prompt_template.replace("{}", pick.question), " " + pick.answer)]

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            idx = rng.integers(len(pool), size=b)
            rows = [row(pool[i]) for i in idx]
            q_ids, q_mask = _pad([instruction_ids(r[0]) for r in rows], q.pad_token_id)
            ids, mask, labels = _encode(tok, [r[1] for r in rows], context, specials=specials)
            yield feats[idx], q_ids, q_mask, ids, mask, labels

    def loss(_: nn.Module, batch: Any) -> torch.Tensor:
        image, q_ids, q_mask, ids, mask, labels = batch
        return _prefix_loss(model, model.instructed_query_outputs(image, q_ids, q_mask), ids, mask, labels)

    tc = TrainConfig(
        steps=settings.steps,
        lr=settings.lr,
        warmup=min(50, settings.steps // 10),
        seed=settings.seed,
        threads=settings.threads,
        time_budget_s=settings.budget_s,
        bf16=settings.bf16,
    )
    started = time.perf_counter()
    losses = run_training(model, batches(), loss, tc, progress=progress, desc=f"{settings.preset} instruct")
    info = {
        "preset": settings.preset,
        "init": str(settings.blip2_checkpoint),
        "steps": len(losses),
        "batch_size": b,
        "lr": settings.lr,
        "instructed": settings.instructed,
        "pool": {"scenes": len(pool), "seconds": round(encoded_s, 1)},
        "first_loss": round(float(np.mean(losses[:5])), 4),
        "final_loss": round(float(np.mean(losses[-20:])), 4),
        "train_seconds": round(time.perf_counter() - started, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "bf16": settings.bf16 and amx_bf16_fast(),
    }
    log.info("instruct: %d steps, loss %.3f -> %.3f", len(losses), info["first_loss"], info["final_loss"])
    return save_checkpoint(
        out,
        family.name,
        cfg.to_dict(),
        model.eval(),
        tok_json,
        extra={"train": info},
        instruction_tokenizer_json=tok_json,
    )


def train(out: str | Path, request: TrainRequest, progress: bool | None = None) -> Path:
    """`mmedge train` for InstructBLIP presets: `--init BLIP2_CHECKPOINT`, synthetic scene questions."""
    if not request.init:
        raise ConfigError(
            "InstructBLIP tunes a trained BLIP-2: pass --init BLIP2_CHECKPOINT (e.g. the demo's "
            "$MMEDGE_HOME/checkpoints/blip2-tiny)"
        )
    if request.data is not None:
        raise ConfigError(
            "the InstructBLIP recipe trains on synthetic scene questions; --data is not supported"
        )
    settings = InstructTrainSettings(
        blip2_checkpoint=request.init,
        preset=request.preset,
        seed=request.seed,
        threads=request.threads,
        bf16=request.bf16,
        budget_s=request.time_budget_s,
        steps=request.steps or InstructTrainSettings.steps,
        batch_size=request.batch_size or InstructTrainSettings.batch_size,
        lr=request.lr or InstructTrainSettings.lr,
    )
    return train_instructblip(out, settings, progress=progress)


__all__ = ["InstructTrainSettings", "instruct_config", "train", "train_instructblip"]
