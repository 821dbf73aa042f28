"""Train a text-to-image model (the stable-diffusion family) on synthetic one-object scenes.

Every batch is freshly drawn scenes with freshly phrased captions ("a large red circle at the top
left"); a share of the captions is dropped (the empty prompt) so that the model also learns the
unconditional prediction classifier-free guidance needs. The noise schedule and prediction type are
the preset's scheduler config, applied with diffusers' `DDPMScheduler` (training only; the runtime
samples with its numpy schedulers). The U-Net and the text encoder train together from scratch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mmedge.data.scenes import TRAIN_SEED
from mmedge.data.tokenizer_train import EOS_ID, PAD_ID, train_tokenizer
from mmedge.errors import UnsupportedError, require
from mmedge.models.checkpoint import save_checkpoint
from mmedge.models.registry import load_preset
from mmedge.models.sd.modeling import SDConfig, StableDiffusion
from mmedge.recipes.base import TrainRequest, loss_record, train_config
from mmedge.recipes.trainer import amx_bf16_fast
from mmedge.recipes.trainer import train as run_training
from mmedge.runtime.texts import TextTokenizer

log = logging.getLogger(__name__)

# The demo's setting (about 11 minutes on 2 cores). Too few for sd-tiny to follow its captions: this
# recipe at 1000 steps drew the captioned colour in 0.58 of 200 held-out captions and the shape in
# 0.23; an experiment of 2500 steps with clean-image prediction reached 0.985 and 0.46
# (benchmarks/RESULTS.md, "sd-tiny").
DEFAULT_STEPS = 1000
DEFAULT_BATCH = 64
DEFAULT_LR = 2e-3
CAPTION_DROPOUT = 0.1  # rows trained on the empty prompt (the unconditional prediction)


def _training_schedule(cfg: SDConfig) -> object:
    """diffusers' DDPM scheduler over the preset's noise schedule and prediction type."""
    diffusers = require("diffusers", "diffusion")
    s = cfg.scheduler
    return diffusers.DDPMScheduler(
        num_train_timesteps=s.get("num_train_timesteps", 1000),
        beta_start=s.get("beta_start", 0.0001),
        beta_end=s.get("beta_end", 0.02),
        beta_schedule=s.get("beta_schedule", "linear"),
        prediction_type=s.get("prediction_type", "epsilon"),
    )


def _batches(
    tokenizer: TextTokenizer, side: int, batch: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (pixels in [-1, 1] (B, 3, S, S), ids padded to the context (B, L)) of fresh scenes."""
    from mmedge.data import caption_for, render
    from mmedge.evaluation.drawn_scenes import random_object

    rng = np.random.default_rng(np.random.SeedSequence(entropy=TRAIN_SEED, spawn_key=(seed, 5)))
    while True:
        objs = [random_object(rng) for _ in range(batch)]
        images = np.stack([render([o], side, rng) for o in objs]).astype(np.float32) / 127.5 - 1
        captions = ["" if rng.random() < CAPTION_DROPOUT else caption_for([o], rng) for o in objs]
        ids = tokenizer.encode_padded(captions, tokenizer.context_length)
        yield torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ids)


def train(out: str | Path, request: TrainRequest, progress: bool | None = None) -> Path:
    """Train `request.preset` (a pixel-space model) and save a checkpoint directory at `out`."""
    from mmedge.data import caption_for, generate_scenes

    if request.data is not None or request.init is not None:
        raise UnsupportedError(
            "the stable-diffusion recipe trains from scratch on synthetic scenes (no --data, --init)"
        )
    t0 = time.perf_counter()
    family, raw = load_preset(request.preset)
    rng = np.random.default_rng(request.seed)
    captions = [caption_for(s.objects, rng) for s in generate_scenes(2000, seed=TRAIN_SEED, image_size=32)]
    tok = train_tokenizer(captions, vocab_size=256)
    text = {**raw["text"], "vocab_size": tok.get_vocab_size(), "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    cfg: SDConfig = family.config_from_dict({**raw, "text": text})
    if cfg.vae is not None:
        raise UnsupportedError(
            'the stable-diffusion recipe trains pixel-space models (a preset with "vae": null)'
        )
    torch.manual_seed(request.seed)
    model = StableDiffusion(cfg)
    tokenizer_json = str(tok.to_str())
    tokenizer = TextTokenizer.from_json(tokenizer_json, cfg.text.context_length, cfg.text.pad_token_id)
    schedule = _training_schedule(cfg)
    prediction = cfg.scheduler.get("prediction_type", "epsilon")
    steps_total = schedule.config.num_train_timesteps  # type: ignore[attr-defined]

    def loss_fn(m: StableDiffusion, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, ids = batch
        noise = torch.randn_like(images)
        t = torch.randint(0, steps_total, (images.shape[0],))
        noisy = schedule.add_noise(images, noise, t)  # type: ignore[attr-defined]
        target = {"epsilon": noise, "sample": images}.get(prediction)
        if target is None:  # v_prediction
            target = schedule.get_velocity(images, noise, t)  # type: ignore[attr-defined]
        pred = m.denoise(noisy, t.to(torch.float32), m.encode_prompt(ids))
        return torch.nn.functional.mse_loss(pred.float(), target)

    batch = request.batch_size or DEFAULT_BATCH
    batches = _batches(tokenizer, cfg.sample_size, batch, request.seed)
    tc = train_config(request, DEFAULT_STEPS, DEFAULT_LR)
    losses = run_training(model, batches, loss_fn, tc, progress=progress, desc=f"train {request.preset}")
    info = {
        "train": {
            "preset": request.preset,
            "data": "synthetic one-object scenes",
            "steps": len(losses),
            "batch_size": batch,
            "caption_dropout": CAPTION_DROPOUT,
            "bf16": request.bf16 and amx_bf16_fast(),
            **loss_record(losses, t0),
        }
    }
    log.info("trained %d steps, final loss %.4f", len(losses), info["train"]["final_loss"])
    return save_checkpoint(out, family.name, cfg.to_dict(), model, tokenizer_json, extra=info)
