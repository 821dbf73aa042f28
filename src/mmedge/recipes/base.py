"""What `mmedge train` asks of a recipe, and how a preset finds its family's recipe.

A recipe module (named by its family's `Family.recipe`) exposes `train(out, request, progress)`.
`--data` means what it means everywhere (`shapes:N`, `train-shapes:N`, an image folder, a JSONL of
{"image", "text"}; chat recipes also take a JSONL of LLaVA-style conversations); `--init` starts
from an mmedge checkpoint or an HF directory instead of random weights.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models.registry import Family, load_preset
from mmedge.recipes.trainer import TrainConfig


@dataclass(frozen=True)
class TrainRequest:
    """One training run. None means the recipe's default (its demo setting)."""

    preset: str
    data: str | None = None  # None: the recipe's synthetic scenes
    init: str | None = None  # an mmedge checkpoint or HF directory to start from
    steps: int | None = None  # a multi-stage recipe takes this many steps in each stage
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    threads: int = 0
    time_budget_s: float | None = None
    bf16: bool = True  # bf16 autocast where the CPU has AMX tiles (`trainer.amx_bf16_fast`)
    hard_negatives: int | None = None  # clip on synthetic scenes: rows that edit one attribute of another

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"time budget must be positive, got {self.time_budget_s!r}")


def train_config(request: TrainRequest, default_steps: int, default_lr: float) -> TrainConfig:
    """The trainer's settings for a request: its steps and learning rate, or the recipe's defaults."""
    steps = request.steps or default_steps
    return TrainConfig(
        steps=steps,
        lr=request.lr or default_lr,
        warmup=min(50, steps // 10),
        seed=request.seed,
        threads=request.threads,
        time_budget_s=request.time_budget_s,
        bf16=request.bf16,
    )


def require_clip_start(request: TrainRequest, recipe: str, why: str) -> None:
    """Refuse a request of a recipe that trains on synthetic data around a trained clip: `--data`
    given, or `--init` missing or not a clip checkpoint; `why` says what the clip is for."""
    from mmedge.models.checkpoint import read_checkpoint_meta

    if request.data is not None:
        raise UnsupportedError(f"the {recipe} recipe trains on synthetic data (no --data)")
    if request.init is None:
        raise ConfigError(
            f"{why}: pass --init CLIP_CHECKPOINT (e.g. the demo's $MMEDGE_HOME/checkpoints/clip-tiny)"
        )
    if read_checkpoint_meta(request.init).get("family") != "clip":
        raise ConfigError(f"--init {request.init!r} is not a clip checkpoint")


def recipe_for(preset: str) -> tuple[Family, Any]:
    """(family, recipe module) of a preset; families without a recipe are refused by name."""
    family, _ = load_preset(preset)
    if family.recipe is None:
        raise UnsupportedError(f"family {family.name!r} (preset {preset!r}) has no training recipe")
    return family, importlib.import_module(family.recipe)


def train_model(
    out: str | Path, request: TrainRequest, progress: bool | None = None, force: bool = False
) -> Path:
    """Run the preset's recipe; returns the checkpoint directory written at `out` (an older
    checkpoint there is replaced; a folder holding anything else is refused unless `force`)."""
    from mmedge.models.checkpoint import is_checkpoint
    from mmedge.runtime.staging import check_replaceable

    check_replaceable(out, is_checkpoint, "checkpoint", force)
    _, recipe = recipe_for(request.preset)
    path: Path = recipe.train(out, request, progress=progress)
    return path


def check_init_family(family: Family, loaded_family: Family, init: str) -> None:
    if loaded_family.name != family.name:
        raise ConfigError(
            f"--init {init!r} is a {loaded_family.name!r} model; this recipe trains {family.name!r}"
        )


def loss_record(losses: Sequence[float], started: float) -> dict[str, float]:
    """A training run's record: first and final loss (the means of its first 5 and last 20 steps)
    and the seconds since `started` (`time.perf_counter()`)."""
    return {
        "first_loss": float(np.mean(losses[:5])),
        "final_loss": float(np.mean(losses[-20:])),
        "seconds": round(time.perf_counter() - started, 1),
    }
