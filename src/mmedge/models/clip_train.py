"""Train a CLIP preset on synthetic scenes with ITC; writes an mmedge checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmedge.models.checkpoint import save_checkpoint
from mmedge.models.clip import CLIP, CLIPConfig
from mmedge.models.families import load_preset
from mmedge.models.losses import itc_loss
from mmedge.models.tokenizer_train import EOS_ID, PAD_ID, train_tokenizer
from mmedge.models.trainer import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CLIPTrainSettings:
    preset: str = "clip-tiny"
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    pool: int = 20_000  # distinct training scenes rendered up front
    seed: int = 0
    threads: int = 0
    time_budget_s: float | None = None


def _pixels(images: list[np.ndarray], cfg) -> np.ndarray:  # noqa: ANN001 - PreprocessConfig
    from mmedge.runtime.images import preprocess

    return preprocess(images, cfg)


def _batches(scenes, tokenizer, pre, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:  # noqa: ANN001
    """Random batches of (pixels, ids, mask), each caption freshly phrased."""
    from mmedge.data import caption_for

    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(_pixels([s.image for s in scenes], pre))  # (P, 3, S, S), once
    keys = [s.key for s in scenes]
    while True:
        idx = rng.choice(len(scenes), size=batch_size, replace=False)
        # Identical scenes in one batch would be false negatives; keep the first of each.
        seen, keep = set(), []
        for i in idx.tolist():
            if keys[i] not in seen:
                seen.add(keys[i])
                keep.append(i)
        texts = [caption_for(scenes[i].objects, rng) for i in keep]
        ids, mask = tokenizer.encode_batch(texts)
        yield pixels[keep], torch.from_numpy(ids), torch.from_numpy(mask)


def _loss(model: CLIP, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    pixels, ids, mask = batch
    return itc_loss(model.encode_image(pixels), model.encode_text(ids, mask), model.logit_scale)


def train_clip(out: str | Path, settings: CLIPTrainSettings = CLIPTrainSettings(), progress: bool | None = None) -> Path:
    """Train `settings.preset` on synthetic scenes and save a checkpoint directory at `out`."""
    from mmedge.data import TRAIN_SEED, caption_for, generate_scenes
    from mmedge.runtime.images import PreprocessConfig
    from mmedge.runtime.texts import TextTokenizer

    family, raw = load_preset(settings.preset)
    t0 = time.perf_counter()
    scenes = generate_scenes(settings.pool, seed=TRAIN_SEED, image_size=raw["vision"]["image_size"])
    rng = np.random.default_rng(settings.seed)
    corpus = [caption_for(s.objects, rng) for s in scenes[:4000]]
    tok = train_tokenizer(corpus)
    raw = {**raw, "text": {**raw["text"], "vocab_size": tok.get_vocab_size(), "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}}
    cfg: CLIPConfig = family.parse_config(raw)
    tokenizer = TextTokenizer.from_json(tok.to_str(), context_length=cfg.text.context_length, pad_id=PAD_ID)
    pre = PreprocessConfig.from_dict(family.preprocess(cfg))
    log.info("rendered %d scenes and trained a %d-token tokenizer in %.1fs", len(scenes), tok.get_vocab_size(),
             time.perf_counter() - t0)
    torch.manual_seed(settings.seed)
    model = CLIP(cfg)
    tc = TrainConfig(steps=settings.steps, lr=settings.lr, warmup=min(100, settings.steps // 10), seed=settings.seed,
                     threads=settings.threads, time_budget_s=settings.time_budget_s)
    losses = train(model, _batches(scenes, tokenizer, pre, settings.batch_size, settings.seed), _loss, tc,
                   progress=progress, desc=f"train {settings.preset}")
    info = {"train": {"preset": settings.preset, "steps": len(losses), "batch_size": settings.batch_size,
                      "final_loss": float(np.mean(losses[-20:])), "seconds": round(time.perf_counter() - t0, 1)}}
    log.info("trained %d steps, final loss %.3f", len(losses), info["train"]["final_loss"])
    return save_checkpoint(out, family.name, cfg.to_dict(), model, tok.to_str(), extra=info)


__all__ = ["CLIPTrainSettings", "train_clip"]
