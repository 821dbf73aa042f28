"""The small training loop: bf16 autocast only where the CPU runs it fast, time budgets, fp32 weights."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from mmedge.recipes import trainer
from mmedge.recipes.trainer import TrainConfig, train


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
    losses = train(
        model,
        _regression_batches(),
        _loss_recording_autocast(seen),
        TrainConfig(steps=60, lr=3e-2, warmup=5, bf16=True),
        progress=False,
    )
    assert seen == [amx] * 60
    assert model.weight.dtype == torch.float32  # autocast computes in bf16; the weights stay fp32
    assert losses[-1] < 0.1 * losses[0]


def test_bf16_off_means_fp32_even_with_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "amx_bf16_fast", lambda: True)
    seen: list[bool] = []
    train(
        nn.Linear(8, 1),
        _regression_batches(),
        _loss_recording_autocast(seen),
        TrainConfig(steps=5, warmup=1),
        progress=False,
    )
    assert seen == [False] * 5


def test_amx_probe_missing_means_no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert trainer.amx_bf16_fast() is False


def test_time_budget_stops_early() -> None:
    losses = train(
        nn.Linear(8, 1),
        _regression_batches(),
        _loss_recording_autocast([]),
        TrainConfig(steps=10**7, warmup=1, time_budget_s=0.3),
        progress=False,
    )
    assert 0 < len(losses) < 10**7


def test_thread_tuner_probes_then_keeps_the_fastest() -> None:
    # 3 warm-up steps, then cycles of 2 steps on 2 threads, 2 on 1, 5 on the faster
    tuner = trainer.ThreadTuner(2, probe=2, period=5, settle=3)
    for s in range(3):
        assert tuner.threads_for(s) == 2
        tuner.record(s, 2, 9.0)  # warm-up steps are not measured
    assert [tuner.threads_for(s) for s in range(3, 7)] == [2, 2, 1, 1]
    for s, secs in zip(range(3, 7), (0.6, 0.5, 0.2, 0.3)):  # one busy core: 1 thread is faster
        tuner.record(s, tuner.threads_for(s), secs)
    assert [tuner.threads_for(s) for s in range(7, 12)] == [1] * 5
    for s, secs in zip(range(12, 16), (0.1, 0.1, 0.2, 0.2)):  # the load went away: 2 threads win again
        tuner.record(s, tuner.threads_for(s), secs)
    assert [tuner.threads_for(s) for s in range(16, 21)] == [2] * 5
    for s, secs in zip(range(21, 25), (0.2, 0.2, 0.19, 0.18)):  # within the margin: keep all threads
        tuner.record(s, tuner.threads_for(s), secs)
    assert tuner.threads_for(25) == 2


def test_thread_tuner_with_one_thread_has_nothing_to_pick() -> None:
    tuner = trainer.ThreadTuner(1)
    for s in range(300):
        assert tuner.threads_for(s) == 1
        tuner.record(s, 1, 0.1)


def test_training_moves_to_the_thread_count_that_runs_faster() -> None:
    import time

    seen: list[int] = []

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        time.sleep(0.01 if seen[-1] > 1 else 0.0)  # as if another process held one of the cores
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    train(
        nn.Linear(8, 1),
        _regression_batches(),
        loss,
        TrainConfig(steps=150, warmup=1, threads=2),
        progress=False,
    )
    assert seen[:18] == [2] * 10 + [2] * 4 + [1] * 4  # warm-up, then the probes
    assert seen[18:138] == [1] * 120
    assert torch.get_num_threads() == 2  # restored for whatever runs next
    seen.clear()
    train(
        nn.Linear(8, 1),
        _regression_batches(),
        loss,
        TrainConfig(steps=20, warmup=1, threads=2, tune_threads=False),
        progress=False,
    )
    assert seen == [2] * 20


def test_an_interrupted_run_restores_the_thread_count() -> None:
    import time

    calls: list[int] = []

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        calls.append(torch.get_num_threads())
        if len(calls) == 30:  # while the tuner runs on one thread
            raise KeyboardInterrupt
        time.sleep(0.01 if calls[-1] > 1 else 0.0)
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    with pytest.raises(KeyboardInterrupt):
        train(
            nn.Linear(8, 1),
            _regression_batches(),
            loss,
            TrainConfig(steps=100, warmup=1, threads=2),
            progress=False,
        )
    assert calls[-1] == 1
    assert torch.get_num_threads() == 2


def test_lr_scales_by_name_prefix() -> None:
    """A part scaled to 0 keeps its weights; the scale applies per parameter-name prefix."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(steps=5, warmup=1, tune_threads=False, lr_scales=(("0.", 0.0),))
    train(model, _regression_batches(), _loss_recording_autocast([]), cfg, progress=False)
    after = list(model.parameters())
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.equal(before[2], after[2])


def test_a_skipped_stage_records_no_loss() -> None:
    """0 steps: `final_loss` is None (JSON null), not the NaN of an empty mean, which a package's
    manifest would refuse when the checkpoint's records reach it."""
    import json

    import torch

    from mmedge.recipes.stages import Stages

    stages = Stages("test", seed=0, threads=1, bf16=False, progress=False)
    module = torch.nn.Linear(2, 1)
    stages.run("lm", module, iter(()), lambda m, b: m(b).sum(), 0, 1e-3)
    assert stages.info["lm"]["steps"] == 0 and stages.info["lm"]["final_loss"] is None
    json.dumps(stages.info, allow_nan=False)
