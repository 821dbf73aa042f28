"""imagebind-tiny: audio, depth, thermal and IMU bound to a frozen clip-tiny's image space.

As ImageBind trains: the image and text encoders are a trained CLIP's (`--init`, required: the demo's
clip-tiny), copied and frozen (`models.imagebind.from_clip`); each further modality's encoder learns
InfoNCE against the image embeddings of the same scenes, and never sees a text. The loss is
symmetric (modality -> image and image -> modality) at the modality's own temperature, the inverse
of its postprocessor's scale (official: audio 20, depth 5, thermal 10, IMU 5; the tiny preset sets
20 for all four).
Scenes that look alike in a modality (equal `data.modalities.modality_key`: a depth map shows no
colour) are all positives of one another. Alignment with text is never trained: it comes through
the shared image space, the emergent behaviour ImageBind is known for.

Data: `POOL` synthetic paired scenes of the training stream (fewer for a short run), each run once through the runtime's own
preprocessing (the audio filterbank is what costs) with its frozen image embedding computed once;
every step draws a batch from that pool.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from mmedge.recipes.base import TrainRequest, loss_record, require_clip_start, train_config
from mmedge.recipes.trainer import train as run_training

log = logging.getLogger(__name__)

TRAINED = ("audio", "depth", "thermal", "imu")  # the encoders that learn; vision and text stay frozen
POOL = 4096  # paired training scenes, preprocessed once
DEFAULT_STEPS = 600
DEFAULT_BATCH = 64
DEFAULT_LR = 2e-3


def build_pool(cfg: Any, model: Any, pre: Any, size: int, progress: bool | None) -> dict[str, Any]:
    """`size` paired training scenes: each modality's encoder input (as the runtime prepares it),
    the frozen image embeddings, and each modality's scene keys (as integer ids)."""
    from tqdm.auto import tqdm

    from mmedge.data import TRAIN_SEED
    from mmedge.data.modalities import SAMPLE_RATE, iter_paired, modality_key
    from mmedge.models.imagebind import modalities as modality_inputs
    from mmedge.runtime.images import preprocess
    from mmedge.runtime.modality_inputs import prepare

    inputs = modality_inputs(cfg)
    present = [m for m in TRAINED if m in cfg.present]
    rows: dict[str, list[np.ndarray]] = {m: [] for m in present}
    keys: dict[str, list[Any]] = {m: [] for m in present}
    pixels = np.empty((size, 3, pre.image_size, pre.image_size), np.float32)
    stream = iter_paired(TRAIN_SEED, cfg.vision.image_size)
    for i in tqdm(
        range(size),
        desc="paired scenes",
        disable=not (sys.stderr.isatty() if progress is None else progress),
        leave=False,
    ):
        paired = next(stream)
        pixels[i] = preprocess([paired.scene.image], pre)[0]
        for m in present:
            rate = SAMPLE_RATE if m == "audio" else None
            (values,) = prepare(m, paired.data(m), getattr(inputs, m), sample_rate=rate).values()
            rows[m].append(values[0])  # one row: a 2 s recording is one clip
            keys[m].append(modality_key(paired.scene.objects, m))
    with torch.no_grad():
        image = torch.cat(
            [model.encode_image(torch.from_numpy(pixels[a : a + 256])) for a in range(0, size, 256)]
        )
    pool: dict[str, Any] = {"image": image}
    for m in present:
        ids = {k: j for j, k in enumerate(dict.fromkeys(keys[m]))}
        pool[m] = torch.from_numpy(np.stack(rows[m]))
        pool[f"{m}_key"] = torch.tensor([ids[k] for k in keys[m]], dtype=torch.long)
    return pool


def binding_loss(model: Any, pool: dict[str, Any], idx: torch.Tensor, modalities: list[str]) -> torch.Tensor:
    """Sum over modalities of symmetric InfoNCE between the modality's embeddings and the frozen
    image embeddings of the same scenes; every scene alike in the modality is a positive."""
    image = pool["image"][idx]  # (B, D), unit length, frozen
    total = torch.zeros(())
    for m in modalities:
        encoder = getattr(model, m)
        emb = encoder(pool[m][idx])  # (B, D), unit length
        logits = encoder.log_logit_scale.exp() * emb @ image.T
        key = pool[f"{m}_key"][idx]
        positive = (key[:, None] == key[None, :]).float()
        to_image = -(F.log_softmax(logits, 1) * positive / positive.sum(1, keepdim=True)).sum(1).mean()
        to_modality = -(F.log_softmax(logits, 0) * positive / positive.sum(0, keepdim=True)).sum(0).mean()
        total = total + (to_image + to_modality) / 2
    return total


def train(out: str | Path, request: TrainRequest, progress: bool | None = None) -> Path:
    """Train `request.preset`'s audio, depth, thermal and IMU encoders against a frozen clip's
    image space; save a checkpoint directory at `out`."""
    from mmedge.models.checkpoint import save_checkpoint
    from mmedge.models.imagebind.from_clip import load_clip_towers
    from mmedge.models.registry import load_preset
    from mmedge.models.sources import load_source

    require_clip_start(request, "imagebind", "imagebind trains its further modalities against a frozen clip")
    t0 = time.perf_counter()
    clip = load_source(request.init, family="clip")
    family, raw = load_preset(request.preset)
    raw = {**raw, "text": {**raw["text"], "vocab_size": clip.config.text.vocab_size}}
    cfg = family.config_from_dict(raw)
    torch.manual_seed(request.seed)
    model = family.build(cfg)
    load_clip_towers(model, clip.model)
    for tower in (model.vision, model.text):
        tower.requires_grad_(False)
    model.eval()
    batch = request.batch_size or DEFAULT_BATCH
    tc = train_config(request, DEFAULT_STEPS, DEFAULT_LR)
    pool_size = max(batch, min(POOL, tc.steps * batch))  # no more than training draws
    pool = build_pool(cfg, model, family.preprocess(cfg), pool_size, progress)
    trained = [m for m in TRAINED if m in cfg.present]
    rng = torch.Generator().manual_seed(request.seed)

    def batches() -> Any:
        while True:
            yield torch.randperm(pool_size, generator=rng)[:batch]

    losses = run_training(
        model,
        batches(),
        lambda mdl, idx: binding_loss(mdl, pool, idx, trained),
        tc,
        progress=progress,
        desc=f"train {request.preset}",
    )
    info = {
        "train": {
            "preset": request.preset,
            "data": "synthetic paired scenes",
            "init": request.init,
            "frozen": ["vision", "text"],
            "trained": trained,
            "pool": pool_size,
            "steps": len(losses),
            "batch_size": batch,
            **loss_record(losses, t0),
        }
    }
    log.info("trained %d steps, final loss %.3f", len(losses), info["train"]["final_loss"])
    return save_checkpoint(out, family.name, cfg.to_dict(), model, clip.tokenizer_json, extra=info)
