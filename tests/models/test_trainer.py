"""The small training loop: bf16 autocast only where the CPU runs it fast, time budgets, fp32 weights."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from mmedge.models import trainer
from mmedge.models.trainer import TrainConfig, train


def _regression_batches() -> itertools.cycle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    return itertools.cycle([(x, y)])


def _loss_recording_autocast(seen: list[bool]) -> Callable[[nn.Module, tuple], torch.Tensor]:
    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.append(torch.is_autocast_enabled("cpu"))
        x, y = batch
        return nn.functional.mse_loss(model(x).float(), y)
    return loss


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_autocast_only_where_the_cpu_has_amx(monkeypatch: pytest.MonkeyPatch, amx: bool) -> None:
    monkeypatch.setattr(trainer, "amx_bf16_fast", lambda: amx)
    seen: list[bool] = []
    model = nn.Linear(8, 1)
    losses = train(model, _regression_batches(), _loss_recording_autocast(seen),
                   TrainConfig(steps=60, lr=3e-2, warmup=5, bf16=True), progress=False)
    assert seen == [amx] * 60
    assert model.weight.dtype == torch.float32  # autocast computes in bf16; the weights stay fp32
    assert losses[-1] < 0.1 * losses[0]


def test_bf16_off_means_fp32_even_with_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "amx_bf16_fast", lambda: True)
    seen: list[bool] = []
    train(nn.Linear(8, 1), _regression_batches(), _loss_recording_autocast(seen),
          TrainConfig(steps=5, warmup=1), progress=False)
    assert seen == [False] * 5


def test_amx_probe_missing_means_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert trainer.amx_bf16_fast() is False


def test_time_budget_stops_early() -> None:
    losses = train(nn.Linear(8, 1), _regression_batches(), _loss_recording_autocast([]),
                   TrainConfig(steps=10**7, warmup=1, time_budget_s=0.3), progress=False)
    assert 0 < len(losses) < 10**7
