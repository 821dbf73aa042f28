"""Train a text-to-image model (the stable-diffusion family) on synthetic one-object scenes.

Every batch is freshly drawn scenes with freshly phrased captions ("a large red circle at the top
left"); a share of the captions is dropped (the empty prompt) so that the model also learns the
unconditional prediction classifier-free guidance needs. The noise schedule and prediction type are
the preset's scheduler config, applied with diffusers' `DDPMScheduler` (training only; the runtime
samples with its numpy schedulers). The U-Net and the text encoder train together from scratch.

The loss weighs the object's pixels (and a one-pixel rim) about `FOREGROUND_WEIGHT` times the
background's, each image's object the same in total (`foreground_weights`): the caption decides only
the object, a small share of the image, while the background's grey level and texture are
unpredictable; unweighted, the caption's signal drowns and the model ignores its prompt for the
first thousand-odd steps (benchmarks/RESULTS.md, "sd-tiny").
"""

from __future__ import annotations

import dataclasses
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

# The demo's setting, about 8 minutes of its 10 on 2 cores. 800 x 64 scenes fell short of 1600 x 32
# at equal compute, and 3200 x 16 too. At 1100 steps colour and shape still depend on the run (0.46
# to 0.985 over four runs: benchmarks/RESULTS.md, "sd-tiny" and "`mmedge demo generate` at 1100 steps").
DEFAULT_STEPS = 1100
DEFAULT_BATCH = 32
DEFAULT_LR = 2e-3
CAPTION_DROPOUT = 0.1  # rows trained on the empty prompt (the unconditional prediction)
FOREGROUND_WEIGHT = 10.0  # loss weight of the object's pixels against the background's


def foreground_weights(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) per-pixel loss weights of a batch of clean images in [-1, 1]: 1 on the
    background; on the object (saturated pixels, as the judge finds them) and a one-pixel rim around
    it, FOREGROUND_WEIGHT for an object of the batch's mean size, scaled so that every image's object
    carries the same total weight (a small star's few pixels would otherwise count for a fraction
    of a large square's, and small shapes came out as blobs)."""
    from mmedge.evaluation.drawn_scenes import SATURATION

    saturation = images.amax(1, keepdim=True) - images.amin(1, keepdim=True)
    found = (saturation > SATURATION / 127.5).to(images.dtype)
    rim = torch.nn.functional.max_pool2d(found, 3, stride=1, padding=1)
    pixels = rim.sum((1, 2, 3), keepdim=True)
    share = pixels.mean() / pixels.clamp(min=1)  # 1 for an object of the batch's mean size
    return 1 + (FOREGROUND_WEIGHT - 1) * rim * share


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
        weights = foreground_weights(images)
        return ((pred.float() - target) ** 2 * weights).mean() / weights.mean()

    batch = request.batch_size or DEFAULT_BATCH
    batches = _batches(tokenizer, cfg.sample_size, batch, request.seed)
    # no weight decay: the text encoder learns its words from scratch alongside the U-Net
    tc = dataclasses.replace(train_config(request, DEFAULT_STEPS, DEFAULT_LR), weight_decay=0.0)
    losses = run_training(model, batches, loss_fn, tc, progress=progress, desc=f"train {request.preset}")
    info = {
        "train": {
            "preset": request.preset,
            "data": "synthetic one-object scenes",
            "steps": len(losses),
            "batch_size": batch,
            "caption_dropout": CAPTION_DROPOUT,
            "foreground_weight": FOREGROUND_WEIGHT,
            "bf16": request.bf16 and amx_bf16_fast(),
            **loss_record(losses, t0),
        }
    }
    log.info("trained %d steps, final loss %.4f", len(losses), info["train"]["final_loss"])
    return save_checkpoint(out, family.name, cfg.to_dict(), model, tokenizer_json, extra=info)
