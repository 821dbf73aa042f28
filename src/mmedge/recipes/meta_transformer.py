"""meta-transformer-tiny: per-modality tokenizers and task heads around one frozen shared encoder.

As Meta-Transformer: the encoder is a pretrained image trunk (here a trained CLIP's vision trunk,
`--init`: the demo's clip-tiny; `models.meta_transformer.loaders.load_clip_encoder`) and stays frozen;
only a light tokenizer per modality and a head per task learn. The encoder's sha256 is recorded
before and after training in the checkpoint's `train` record (they must be equal). Tasks, on
synthetic data (`data.modalities`):

- points: which of the six primitives a cloud of 1024 surface points is, grouped as the
  runtime groups it (farthest-point sampling + kNN, `runtime.points`);
- audio: the shape of a one-object scene from its sound (shape sets the timbre);
- imu: the shape of a one-object scene from its motion (shape sets the movement pattern).

Each modality's pool of `POOL` examples (fewer for a short run) is preprocessed once by the runtime's own preprocessing;
every step draws a batch of each modality and sums the three cross-entropies.
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

from mmedge.errors import ConfigError
from mmedge.recipes.base import TrainRequest, loss_record, require_clip_start, train_config
from mmedge.recipes.trainer import train as run_training

log = logging.getLogger(__name__)

POOL = 2048  # examples per modality, preprocessed once
DEFAULT_STEPS = 600
DEFAULT_BATCH = 32  # per modality
DEFAULT_LR = 2e-3


def build_pool(cfg: Any, size: int, seed: int, progress: bool | None) -> dict[str, Any]:
    """Each modality's examples as the runtime prepares them, with their labels."""
    from tqdm.auto import tqdm

    from mmedge.data.modalities import SAMPLE_RATE, labelled_examples
    from mmedge.models.meta_transformer import modalities
    from mmedge.runtime.modality_inputs import prepare

    inputs = modalities(cfg)  # the package's own preprocessing of each path
    pool: dict[str, Any] = {}
    for m in cfg.modalities:
        raw, labels, names = labelled_examples(m, size, seed)
        expected = tuple(cfg.modality(m).labels)
        if expected and expected != tuple(names):
            raise ConfigError(
                f"meta-transformer {m} labels {list(expected)}; the synthetic task's are {list(names)}"
            )
        rate = SAMPLE_RATE if m == "audio" else None
        parts = [
            prepare(m, x, getattr(inputs, m), sample_rate=rate)
            for x in tqdm(
                raw,
                desc=f"{m} examples",
                disable=not (sys.stderr.isatty() if progress is None else progress),
                leave=False,
            )
        ]
        pool[m] = [torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in parts[0]]
        pool[f"{m}_labels"] = torch.from_numpy(labels)
    return pool


def task_loss(model: Any, pool: dict[str, Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over modalities of the head's cross-entropy on a batch of that modality."""
    total = torch.zeros(())
    for m, idx in batch.items():
        logits, _ = model(m, *(x[idx] for x in pool[m]))
        total = total + F.cross_entropy(logits, pool[f"{m}_labels"][idx])
    return total


def train(out: str | Path, request: TrainRequest, progress: bool | None = None) -> Path:
    """Train `request.preset`'s tokenizers and heads around a frozen clip vision trunk; save at `out`."""
    from mmedge.models.checkpoint import save_checkpoint
    from mmedge.models.init import tiny_tokenizer_json
    from mmedge.models.meta_transformer.loaders import load_clip_encoder
    from mmedge.models.meta_transformer.modeling import encoder_sha256, freeze_encoder
    from mmedge.models.registry import load_preset

    require_clip_start(
        request, "meta-transformer", "meta-transformer's shared encoder is a trained clip's vision trunk"
    )
    t0 = time.perf_counter()
    family, raw = load_preset(request.preset)
    cfg = family.config_from_dict(raw)
    torch.manual_seed(request.seed)
    model = family.build(cfg)
    load_clip_encoder(model, request.init)
    freeze_encoder(model)
    before = encoder_sha256(model)
    batch = request.batch_size or DEFAULT_BATCH
    tc = train_config(request, DEFAULT_STEPS, DEFAULT_LR)
    size = max(batch, min(POOL, tc.steps * batch))  # no more than training draws
    pool = build_pool(cfg, size, seed=request.seed, progress=progress)
    rng = torch.Generator().manual_seed(request.seed)

    def batches() -> Any:
        while True:
            yield {m: torch.randperm(size, generator=rng)[:batch] for m in cfg.modalities}

    losses = run_training(
        model,
        batches(),
        lambda mdl, b: task_loss(mdl, pool, b),
        tc,
        progress=progress,
        desc=f"train {request.preset}",
    )
    after = encoder_sha256(model)
    if after != before:  # a frozen encoder that moved is a bug, not a result
        raise RuntimeError("the shared encoder changed during training although it was frozen")
    info = {
        "train": {
            "preset": request.preset,
            "data": "synthetic point clouds, recordings and IMU traces",
            "init": request.init,
            "encoder_sha256": {"before": before, "after": after},
            "pool": size,
            "steps": len(losses),
            "batch_size": batch,
            **loss_record(losses, t0),
        }
    }
    log.info("trained %d steps, final loss %.3f", len(losses), info["train"]["final_loss"])
    # packages carry a tokenizer file whatever the family (this one reads no text)
    return save_checkpoint(out, family.name, cfg.to_dict(), model, tiny_tokenizer_json(False), extra=info)
