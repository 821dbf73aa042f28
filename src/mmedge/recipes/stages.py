"""What the staged chat recipes on synthetic scenes (blip2, llava) share: the LM loss, a stage run
with its record, a CLIP checkpoint's tower settings, and a pool of scenes rendered once and encoded
once by the frozen tower (or kept as pixels, for a stage that tunes the tower)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmedge.recipes.trainer import TrainConfig
from mmedge.recipes.trainer import train as run_training
from mmedge.runtime.sections import PreprocessConfig

log = logging.getLogger(__name__)
IGNORE = -100  # label of a position that is not a target
POOL_CHUNK = 256  # scenes per forward pass of the frozen tower


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position i predicts label i+1."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


@dataclass
class Stages:
    """Runs a recipe's stages with shared trainer settings; `info` records each stage's steps, final
    loss and seconds (saved in the checkpoint)."""

    preset: str
    seed: int
    threads: int
    bf16: bool
    progress: bool | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def run(
        self,
        name: str,
        module: nn.Module,
        batches: Iterator[Any],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        steps: int,
        lr: float,
        budget: float | None = None,
        lr_scales: tuple[tuple[str, float], ...] = (),
    ) -> None:
        tc = TrainConfig(
            steps=steps,
            lr=lr,
            warmup=min(50, steps // 10),
            seed=self.seed,
            threads=self.threads,
            time_budget_s=budget,
            bf16=self.bf16,
            lr_scales=lr_scales,
        )
        started = time.perf_counter()
        losses = run_training(
            module, batches, loss_fn, tc, progress=self.progress, desc=f"{self.preset} {name}"
        )
        # a stage of 0 steps (skipped) has no loss: None, not the NaN a package manifest refuses
        final = round(float(np.mean(losses[-20:])), 4) if losses else None
        self.info[name] = {
            "steps": len(losses),
            "final_loss": final,
            "seconds": round(time.perf_counter() - started, 1),
        }
        log.info("%s: %d steps, final loss %s", name, len(losses), final)


def clip_vision(clip: Any) -> dict[str, Any]:
    """A loaded CLIP checkpoint's vision tower settings, as a chat family's `vision` config entry."""
    v = clip.config.vision
    return {
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "width": v.width,
        "layers": v.layers,
        "heads": v.heads,
        "mlp_dim": v.mlp_dim,
        "act": v.act,
        "eps": clip.config.layer_norm_eps,
    }


def render_pool(scenes: list[tuple], pre: PreprocessConfig, rng: np.random.Generator) -> torch.Tensor:
    """Pixel values of every scene (objects), rendered once with the runtime's preprocessing."""
    from mmedge.data import render
    from mmedge.runtime.images import preprocess

    return torch.cat(
        [
            torch.from_numpy(
                preprocess([render(o, pre.image_size, rng) for o in scenes[i : i + POOL_CHUNK]], pre)
            )
            for i in range(0, len(scenes), POOL_CHUNK)
        ]
    )


def encode_pixels(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """The frozen tower's features of a pool's pixel values, in chunks."""
    with torch.no_grad():
        return torch.cat([encode(pixels[i : i + POOL_CHUNK]) for i in range(0, len(pixels), POOL_CHUNK)])


def encode_pool(
    encode: Callable[[torch.Tensor], torch.Tensor],
    scenes: list[tuple],
    pre: PreprocessConfig,
    rng: np.random.Generator,
) -> torch.Tensor:
    """The frozen tower's features of every scene (objects), rendered once with the runtime's
    preprocessing: stages that do not train the tower draw their batches from this pool."""
    from mmedge.data import render
    from mmedge.runtime.images import preprocess

    with torch.no_grad():
        return torch.cat(
            [
                encode(
                    torch.from_numpy(
                        preprocess([render(o, pre.image_size, rng) for o in scenes[i : i + POOL_CHUNK]], pre)
                    )
                )
                for i in range(0, len(scenes), POOL_CHUNK)
            ]
        )
