"""A small training loop: AdamW, warm-up + cosine schedule, gradient clipping, progress bar, and a
thread count re-picked from measured step times when other processes load the CPU."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # 0 = torch default
    # With a budget, schedule progress is max(step fraction, time fraction): on a slow machine the
    # learning rate still anneals to zero by the deadline instead of stopping mid-schedule.
    time_budget_s: float | None = None
    # bf16 autocast where the CPU has AMX tiles (`amx_bf16_fast`); elsewhere bf16 is emulated and slower,
    # so training stays fp32 there.
    bf16: bool = False
    # Re-pick the thread count from measured step times (`ThreadTuner`): a busy core no longer
    # stalls training four- to fivefold.
    tune_threads: bool = True
    # Learning-rate multipliers by parameter-name prefix (the first match applies; others get 1):
    # e.g. a pretrained vision tower tuned gently beside freshly trained parts.
    lr_scales: tuple[tuple[str, float], ...] = ()


def amx_bf16_fast() -> bool:
    """True where torch's CPU kernels run bf16 GEMMs on AMX tiles (measured ~1.3x per clip-tiny step)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


class ThreadTuner:
    """Re-picks the torch thread count while training, from measured step times.

    When another process holds a core, OpenMP's spinning threads stall each other: with one of 2
    cores busy, a clip-tiny step took about 4x as long on 2 threads as on 1. After `settle` warm-up
    steps, every cycle times `probe` steps on each candidate count (the requested count and 1), then
    runs `period` steps on the fastest, so a run adapts when load comes or goes. Fewer threads must
    win by `margin`, more than the step-to-step noise, so an idle machine keeps all its threads; there
    the probes cost no measurable speed (measurements: benchmarks/RESULTS.md; design: docs/demo.md).
    """

    def __init__(
        self, threads: int, probe: int = 4, period: int = 120, settle: int = 10, margin: float = 0.85
    ) -> None:
        self.default = threads
        self.candidates = [threads, 1] if threads > 1 else [threads]
        self.probe, self.period, self.settle, self.margin = probe, period, settle, margin
        self.best = threads
        self._times: dict[int, list[float]] = {}

    @property
    def _probe_steps(self) -> int:
        return self.probe * len(self.candidates)

    def _cycle_pos(self, step: int) -> int | None:
        if len(self.candidates) == 1 or step < self.settle:
            return None
        return (step - self.settle) % (self._probe_steps + self.period)

    def threads_for(self, step: int) -> int:
        """The thread count to run `step` with."""
        pos = self._cycle_pos(step)
        if pos is not None and pos < self._probe_steps:
            return self.candidates[pos // self.probe]
        return self.best

    def record(self, step: int, threads: int, seconds: float) -> None:
        """Note how long `step` took; at the end of a cycle's probes, pick the count to run on."""
        pos = self._cycle_pos(step)
        if pos is None:
            return
        if pos == 0:
            self._times = {}
        self._times.setdefault(threads, []).append(seconds)
        if pos == self._probe_steps - 1:
            medians = {n: sorted(t)[len(t) // 2] for n, t in self._times.items() if t}
            fewer = min(medians, key=medians.__getitem__)
            best = (
                fewer if medians[fewer] < self.margin * medians.get(self.default, math.inf) else self.default
            )
            if best != self.best:
                log.info(
                    "training on %d thread(s): median step %s ms",
                    best,
                    {n: round(m * 1e3) for n, m in medians.items()},
                )
            self.best = best


def fused_adamw_on_cpu() -> bool:
    """torch >= 2.4 has a fused CPU AdamW: one kernel for all parameters, which makes clip-tiny's
    optimizer update about 3x cheaper than the per-parameter loop (measurements: benchmarks/RESULTS.md)."""
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 4)


def train(
    model: nn.Module,
    batches: Iterator,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    cfg: TrainConfig,
    progress: bool | None = None,
    desc: str = "train",
) -> list[float]:
    """Run `cfg.steps` optimisation steps; returns the loss per step."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    tuner = ThreadTuner(threads) if cfg.tune_threads else None
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # frozen parts stay as they are

    def scale_of(name: str) -> float:
        return next((s for prefix, s in cfg.lr_scales if name.startswith(prefix)), 1.0)

    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in params:
        groups.setdefault((p.ndim >= 2 and "embedding" not in name, scale_of(name)), []).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in groups.items()
        ],
        lr=cfg.lr,
        **({"fused": True} if fused_adamw_on_cpu() else {}),
    )

    def progress_at(step: int) -> float:
        t = step / cfg.steps
        if cfg.time_budget_s:
            t = max(t, (time.perf_counter() - start) / cfg.time_budget_s)
        return min(t, 1.0)

    def lr_at(step: int, t: float) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        w = cfg.warmup / cfg.steps
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * max(0.0, t - w) / max(1e-9, 1 - w)))

    show = sys.stderr.isatty() if progress is None else progress
    use_bf16 = cfg.bf16 and amx_bf16_fast()
    bar = tqdm(total=cfg.steps, desc=desc, disable=not show, leave=False)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    try:
        for step in range(cfg.steps):
            t = progress_at(step)
            if t >= 1.0:
                log.info(
                    "%s: time budget of %.0f s reached after %d/%d steps",
                    desc,
                    cfg.time_budget_s,
                    step,
                    cfg.steps,
                )
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, t) * g["lr_scale"]
            n = tuner.threads_for(step) if tuner else threads
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
            t_step = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                loss = loss_fn(model, next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            if tuner:
                tuner.record(step, n, time.perf_counter() - t_step)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:  # an interrupted run must not leave torch on the tuner's thread count
        bar.close()
        torch.set_num_threads(threads)
    model.eval()
    return losses
