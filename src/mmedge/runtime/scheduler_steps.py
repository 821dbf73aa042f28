"""The numpy steppers behind `schedulers.make_scheduler`: DDIM, Euler discrete and DPM-Solver++.

Each mirrors its diffusers 0.42.1 class (DDIMScheduler, EulerDiscreteScheduler,
DPMSolverMultistepScheduler) operation by operation in float32: the noise schedule is rebuilt the way
torch builds it (float32 `torch.linspace`, a cumulative product accumulated in float64), the per-step
scalars are computed once with diffusers' operation order, and a step is a few in-place numpy ops in
that same order, so results round where torch's do. Given torch's schedule, steps match bit for bit;
the schedule itself can differ by one float32 ulp, because x86 torch's sqrt and log (MKL, SLEEF) are
not always correctly rounded and numpy's are. Only the deterministic paths exist (DDIM eta=0, Euler
s_churn=0); the config's checks (`schedulers.SchedulerConfig`) refuse everything else.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mmedge.errors import InvalidInputError

if TYPE_CHECKING:
    from mmedge.runtime.schedulers import SchedulerConfig

_F32 = np.float32


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 `torch.linspace` on CPU, bit for bit."""
    lo, hi = _F32(start), _F32(end)
    if n == 1:  # torch returns `start` alone
        return np.array([lo], dtype=np.float32)
    step = _F32(hi - lo) / _F32(n - 1)
    i = np.arange(n)
    # torch's kernel computes start + step * i (end - step * (n - 1 - i) for the second half) with one
    # FMA rounding; float64 holds step * i exactly, so rounding its sum to float32 gives the same value.
    up = np.float64(lo) + np.float64(step) * i
    down = np.float64(hi) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, up, down).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """float32 `torch.cumprod`, which accumulates in float64 and rounds each output to float32."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """The training schedule's cumulative alpha products (float32, one per training timestep)."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = _linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        root = _linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n)
        betas = root * root  # torch's `** 2` is x * x
    else:  # squaredcos_cap_v2: diffusers' betas_for_alpha_bar in Python floats (once per schedule)

        def bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], dtype=np.float64
        ).astype(np.float32)
    if cfg.rescale_betas_zero_snr:  # diffusers' rescale_zero_terminal_snr, in float32
        root = np.sqrt(_cumprod_f32(1.0 - betas))
        first, last = root[0], root[-1]
        root = (root - last) * (first / (first - last))
        bar_ = root * root
        betas = 1 - np.concatenate([bar_[:1], bar_[1:] / bar_[:-1]])
    return _cumprod_f32(1.0 - betas)


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t`, one sigma at a time as there (at set-up only, never per step)."""
    out = np.empty(len(sigmas), dtype=np.float64)
    for j, sigma in enumerate(sigmas):
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low = int(np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)[0])
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        out[j] = (1 - w) * low + w * (low + 1)
    return out


def _karras(sigma_lo: float, sigma_hi: float, steps: int) -> np.ndarray:
    """Karras et al.'s rho=7 noise levels from `sigma_hi` down to `sigma_lo` (float64, as diffusers)."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_lo ** (1 / 7.0), sigma_hi ** (1 / 7.0)
    return np.asarray((hi + ramp * (lo - hi)) ** 7.0)


def _spaced(cfg: SchedulerConfig, steps: int, last: int, extra: int) -> np.ndarray:
    """Leading or trailing timesteps (float64, descending) over the first `last` training timesteps;
    `extra` is 1 for DPM-Solver, whose leading spacing spans steps + 1 points and drops the final one."""
    if cfg.spacing == "leading":
        ratio = last // (steps + extra)
        grid = (np.arange(0, steps + extra) * ratio).round()[::-1]
        return grid[: len(grid) - extra] + cfg.steps_offset
    # trailing: np.arange overshoots by one element (t = -1) for some counts (steps=61 of 1000 among
    # them), a diffusers 0.42.1 artefact that would run the U-Net once more; it is dropped.
    return np.arange(last, 0, -cfg.num_train_timesteps / steps).round()[:steps] - 1


class Scheduler:
    """A denoising schedule for a fixed number of steps; `step` must run in index order from the
    begin index (0 unless `set_begin_index` says otherwise: image-to-image starts part way)."""

    timesteps: np.ndarray  # float32 (steps,): the `timestep` fed to the U-Net at each index
    init_noise_sigma: float  # initial N(0, 1) latents are multiplied by this
    steps: int

    def __init__(self, config: SchedulerConfig, timesteps: np.ndarray) -> None:
        self.config = config
        self.timesteps = np.ascontiguousarray(timesteps, dtype=np.float32)
        self.timesteps.flags.writeable = False  # shared with callers; the schedule is fixed
        self.steps = len(self.timesteps)
        if self.steps > 1 and self.timesteps[0] == self.timesteps[1]:
            # diffusers would find the first timestep at index 1 and skip a step
            raise InvalidInputError(
                f"{self.steps} steps repeat the first timestep {self.timesteps[0]:g} with "
                f"{config.spacing} spacing over {config.num_train_timesteps} training timesteps; "
                "use fewer steps"
            )
        self.init_noise_sigma = 1.0
        self.begin_index = 0
        self._next = 0
        self._shape: tuple[int, ...] | None = None
        self._outs: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.float32), np.empty(0, np.float32))
        self._tmp = self._tmp2 = np.empty(0, np.float32)

    def set_begin_index(self, index: int) -> None:
        """Start runs at `index` (diffusers' `set_begin_index`): image-to-image denoises only the
        schedule's last steps, from a sample noised to that index (`add_noise`)."""
        self._check_index(index)
        self.begin_index = self._next = int(index)

    def add_noise(self, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """`original` noised to the begin index's level, as diffusers' `add_noise` at that timestep."""
        x, n = _f32(original, "original"), _f32(noise, "noise")
        if x.shape != n.shape:
            raise InvalidInputError(f"noise shape {n.shape} differs from the sample's {x.shape}")
        signal, spread = self._noise_scales(self.begin_index)
        return (x * signal + n * spread).astype(np.float32)

    def _noise_scales(self, index: int) -> tuple[np.float32, np.float32]:
        """(signal, noise) factors of a sample noised to `index`'s level."""
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        """The U-Net's input at `index`: `sample` itself unless the scheduler scales it (Euler)."""
        self._check_index(index)
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray) -> np.ndarray:
        """The previous (less noisy) sample; the returned buffer is reused by later steps."""
        self._check_index(index)
        if index != self.begin_index and index != self._next:  # the begin index always starts a new run
            raise InvalidInputError(
                f"scheduler step {index} called out of order: steps run {self.begin_index}, "
                f"{self.begin_index + 1}, ... {self.steps - 1} and the next one is {self._next}"
            )
        mo, x = _f32(model_output, "model_output"), _f32(sample, "sample")
        if mo.shape != x.shape:
            raise InvalidInputError(f"model_output shape {mo.shape} differs from the sample's {x.shape}")
        if x.shape != self._shape:
            if index != self.begin_index:
                raise InvalidInputError(f"sample shape {x.shape} changed mid-run (was {self._shape})")
            self._alloc(x.shape)
        out = self._outs[0]
        # ping-pong output buffers: a caller feeding back the last result must not read what it writes
        if np.may_share_memory(out, x) or np.may_share_memory(out, mo):
            out = self._outs[1]
        self._step(mo, index, x, out)
        self._next = index + 1
        return out

    def _alloc(self, shape: tuple[int, ...]) -> None:
        self._shape = shape
        self._outs = (np.empty(shape, np.float32), np.empty(shape, np.float32))
        self._tmp, self._tmp2 = np.empty(shape, np.float32), np.empty(shape, np.float32)

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.steps:
            raise InvalidInputError(f"scheduler index must be an int in [0, {self.steps - 1}], got {index!r}")

    def _step(self, mo: np.ndarray, index: int, x: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError


def _f32(value: np.ndarray, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be a float array, got {type(value).__name__}") from exc


class DDIM(Scheduler):
    """diffusers' DDIMScheduler with eta=0 (deterministic)."""

    def __init__(self, config: SchedulerConfig, steps: int) -> None:
        n = config.num_train_timesteps
        if config.spacing == "linspace":
            t = np.linspace(0, n - 1, steps).round()[::-1]
        else:
            t = _spaced(config, steps, n, 0)
        t = t.astype(np.int64)
        if t.max() >= n:
            raise InvalidInputError(
                f"{steps} steps with leading spacing and steps_offset {config.steps_offset} reach timestep "
                f"{t.max()}, past the last trained one ({n - 1}); use fewer steps"
            )
        super().__init__(config, t)
        ac = alphas_cumprod(config)
        final = _F32(1.0) if config.set_alpha_to_one else ac[0]
        prev = t - n // steps  # diffusers steps back by n // steps whatever the spacing
        a_t, a_prev = ac[t], np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
        self._sa, self._sb = np.sqrt(a_t), np.sqrt(1 - a_t)  # also diffusers' add_noise factors at t
        self._sa_prev, self._dir = np.sqrt(a_prev), np.sqrt(1 - a_prev)  # eta=0: no variance term
        self._clip = float(config.clip_sample_range) if config.clip_sample else None

    def _noise_scales(self, index: int) -> tuple[np.float32, np.float32]:
        return self._sa[index], self._sb[index]

    def _step(self, mo: np.ndarray, index: int, x: np.ndarray, out: np.ndarray) -> None:
        sa, sb = self._sa[index], self._sb[index]
        x0, eps, kind = self._tmp, self._tmp2, self.config.prediction_type
        if kind == "epsilon":  # x0 = (x - sqrt(1 - a) * eps) / sqrt(a)
            np.multiply(mo, sb, out=x0)
            np.subtract(x, x0, out=x0)
            np.divide(x0, sa, out=x0)
            eps = mo
        elif kind == "sample":  # eps = (x - sqrt(a) * x0) / sqrt(1 - a), from the unclipped x0
            np.multiply(mo, sa, out=eps)
            np.subtract(x, eps, out=eps)
            np.divide(eps, sb, out=eps)
            np.copyto(x0, mo)
        else:  # v_prediction: x0 = sqrt(a) x - sqrt(1 - a) v, eps = sqrt(a) v + sqrt(1 - a) x
            np.multiply(x, sa, out=x0)
            np.multiply(mo, sb, out=out)
            np.subtract(x0, out, out=x0)
            np.multiply(mo, sa, out=eps)
            np.multiply(x, sb, out=out)
            np.add(eps, out, out=eps)
        if self._clip is not None:
            np.clip(x0, -self._clip, self._clip, out=x0)
        np.multiply(x0, self._sa_prev[index], out=out)
        np.multiply(eps, self._dir[index], out=x0)  # x0 is no longer needed
        np.add(out, x0, out=out)


def _noise_sigmas(ac: np.ndarray) -> np.ndarray:
    return np.sqrt((1 - ac) / ac)  # float32, as diffusers' ((1 - a) / a) ** 0.5


def _final_sigma(cfg: SchedulerConfig, ac: np.ndarray) -> np.float32:
    return _F32(0.0) if cfg.final_sigmas_type == "zero" else np.sqrt((1 - ac[0]) / ac[0])


class Euler(Scheduler):
    """diffusers' EulerDiscreteScheduler with s_churn=0 (deterministic), linear sigma interpolation."""

    def __init__(self, config: SchedulerConfig, steps: int) -> None:
        n = config.num_train_timesteps
        ac = alphas_cumprod(config)
        if config.rescale_betas_zero_snr:
            ac[-1] = 2.0**-24  # diffusers keeps the last sigma finite
        full = _noise_sigmas(ac)
        if config.spacing == "linspace":
            t = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
        else:
            t = _spaced(config, steps, n, 0)
        t = t.astype(np.float32)  # diffusers interpolates at float32 timesteps
        sig = np.interp(t, np.arange(n), full)
        if config.use_karras_sigmas:
            lo = config.sigma_min if config.sigma_min is not None else float(sig[-1])
            hi = config.sigma_max if config.sigma_max is not None else float(sig[0])
            sig = _karras(lo, hi, steps)
            t = _sigma_to_t(sig, np.log(full)).astype(np.float32)
        self._sigmas = np.concatenate([sig, [_final_sigma(config, ac)]]).astype(np.float32)
        if config.timestep_type == "continuous" and config.prediction_type == "v_prediction":
            t = _F32(0.25) * _log32(self._sigmas[:-1])  # diffusers' 0.25 * log(sigma)
        super().__init__(config, t)
        top = self._sigmas.max()
        leading = config.spacing == "leading"
        self.init_noise_sigma = float(np.sqrt(top * top + 1) if leading else top)
        s = self._sigmas[:-1]
        self._in_scale = np.sqrt(s * s + 1)  # scale_model_input divides by sqrt(sigma^2 + 1)
        self._dt = self._sigmas[1:] - s
        # v_prediction: x0 = v * (-sigma / sqrt(sigma^2 + 1)) + x / (sigma^2 + 1)
        self._v_mo = -s / self._in_scale
        self._v_x = s * s + 1
        self._scaled = np.empty(0, np.float32)

    def _noise_scales(self, index: int) -> tuple[np.float32, np.float32]:
        return _F32(1.0), self._sigmas[index]  # x + sigma * noise

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        """`sample / sqrt(sigma^2 + 1)` at `index`, in a buffer reused by later calls."""
        self._check_index(index)
        x = _f32(sample, "sample")
        if self._scaled.shape != x.shape:
            self._scaled = np.empty(x.shape, np.float32)
        return np.divide(x, self._in_scale[index], out=self._scaled)

    def _step(self, mo: np.ndarray, index: int, x: np.ndarray, out: np.ndarray) -> None:
        sigma, x0, kind = self._sigmas[index], self._tmp, self.config.prediction_type
        if kind == "epsilon":  # x0 = x - sigma * eps
            np.multiply(mo, sigma, out=x0)
            np.subtract(x, x0, out=x0)
        elif kind == "v_prediction":
            np.multiply(mo, self._v_mo[index], out=x0)
            np.divide(x, self._v_x[index], out=out)
            np.add(x0, out, out=x0)
        else:
            x0 = mo
        # derivative = (x - x0) / sigma; x_prev = x + derivative * (sigma_next - sigma)
        np.subtract(x, x0, out=self._tmp)
        np.divide(self._tmp, sigma, out=self._tmp)
        np.multiply(self._tmp, self._dt[index], out=self._tmp)
        np.add(x, self._tmp, out=out)


class DPMSolverPP(Scheduler):
    """diffusers' DPMSolverMultistepScheduler, algorithm_type dpmsolver++, solver order 1 or 2."""

    def __init__(self, config: SchedulerConfig, steps: int) -> None:
        n = config.num_train_timesteps
        ac = alphas_cumprod(config)
        if config.rescale_betas_zero_snr:
            ac[-1] = 2.0**-24
        full = _noise_sigmas(ac)
        if config.use_karras_sigmas:  # spacing and lambda clipping do not apply: t follows the sigmas
            # the class has no sigma_min/sigma_max, but reads them when a config carries them
            lo = config.sigma_min if config.sigma_min is not None else float(full[0])
            hi = config.sigma_max if config.sigma_max is not None else float(full[-1])
            sig = _karras(lo, hi, steps)
            t = _sigma_to_t(sig, np.log(full))
            if config.beta_schedule != "squaredcos_cap_v2":
                t = t.round()
        else:
            last = n
            if config.lambda_min_clipped is not None:  # diffusers' searchsorted on the flipped lambdas
                lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
                last = n - int(np.searchsorted(lam[::-1], config.lambda_min_clipped))
            if config.spacing == "linspace":
                t = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
            else:
                t = _spaced(config, steps, last, 1)
            sig = np.interp(t.astype(np.int64), np.arange(n), full)
        super().__init__(config, t.astype(np.int64))  # truncates unrounded (squaredcos) Karras t, as torch
        sigmas = np.concatenate([sig, [_final_sigma(config, ac)]]).astype(np.float32)
        # diffusers' _sigma_to_alpha_sigma_t and lambda = log(alpha) - log(sigma), per sigma
        alpha = 1 / np.sqrt(sigmas * sigmas + 1)
        sigma = sigmas * alpha
        # a final sigma of 0 gives lambda = inf and exp(-h) = 0, as in torch; a repeated sigma (h = 0) is
        # refused below where diffusers would produce NaN
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = _log32(alpha) - _log32(sigma)
            h = lam[1:] - lam[:-1]  # h at index i: lambda(i + 1) - lambda(i)
            em1 = _exp32(-h) - 1
            a_next = alpha[1:]
            self._alpha, self._sigma = alpha[:-1], sigma[:-1]
            self._c_x = sigma[1:] / sigma[:-1]  # x_t = (sigma_t / sigma_s) x - alpha_t (exp(-h) - 1) D0 ...
            self._c_d0 = a_next * em1
            if config.solver_type == "midpoint":
                self._c_d1 = -(_F32(0.5) * self._c_d0)  # ... - 0.5 alpha_t (exp(-h) - 1) D1
            else:
                self._c_d1 = a_next * (em1 / h + 1)  # ... + alpha_t ((exp(-h) - 1) / h + 1) D1
            self._inv_r0 = np.ones_like(h)
            self._inv_r0[1:] = 1 / (h[:-1] / h[1:])  # D1 = (1 / r0) (m0 - m1), r0 = h_prev / h
        last_low = config.euler_at_final or (config.lower_order_final and self.steps < 15)
        last_low = last_low or config.final_sigmas_type == "zero"
        self._second = np.arange(self.steps) > 0
        if config.solver_order == 1:
            self._second[:] = False
        elif last_low:
            self._second[-1] = False
        used = np.concatenate([self._c_x, self._c_d0, self._inv_r0[self._second], self._c_d1[self._second]])
        if not np.all(np.isfinite(used)):  # a repeated noise level: h = 0 divides by zero (NaN in diffusers)
            k = int(np.argmax(sigmas[1:] == sigmas[:-1]))
            fixes = ["fewer steps"] + (["solver_type midpoint"] if config.solver_type == "heun" else [])
            fixes += ["final_sigmas_type zero"] if config.final_sigmas_type == "sigma_min" else []
            raise InvalidInputError(
                f"{steps} steps repeat the noise level {sigmas[k]:g} (steps {k} and {k + 1} of the schedule), "
                f"where the {config.solver_type} solver divides by zero; use {' or '.join(fixes)}"
            )
        self._x0 = (np.empty(0, np.float32), np.empty(0, np.float32))

    def _alloc(self, shape: tuple[int, ...]) -> None:
        super()._alloc(shape)
        self._x0 = (np.empty(shape, np.float32), np.empty(shape, np.float32))  # this and the last x0

    def _noise_scales(self, index: int) -> tuple[np.float32, np.float32]:
        return self._alpha[index], self._sigma[index]  # alpha_t x + sigma_t noise

    def _step(self, mo: np.ndarray, index: int, x: np.ndarray, out: np.ndarray) -> None:
        x0, tmp, kind = self._x0[index % 2], self._tmp, self.config.prediction_type
        if kind == "epsilon":  # diffusers' convert_model_output: x0 = (x - sigma eps) / alpha
            np.multiply(mo, self._sigma[index], out=x0)
            np.subtract(x, x0, out=x0)
            np.divide(x0, self._alpha[index], out=x0)
        elif kind == "v_prediction":  # x0 = alpha x - sigma v
            np.multiply(x, self._alpha[index], out=x0)
            np.multiply(mo, self._sigma[index], out=tmp)
            np.subtract(x0, tmp, out=x0)
        else:
            np.copyto(x0, mo)  # kept for the next step's difference
        np.multiply(x, self._c_x[index], out=out)
        np.multiply(x0, self._c_d0[index], out=tmp)
        np.subtract(out, tmp, out=out)
        if self._second[index] and index > self.begin_index:  # a run's first step has no last x0
            np.subtract(x0, self._x0[(index - 1) % 2], out=tmp)
            np.multiply(tmp, self._inv_r0[index], out=tmp)
            np.multiply(tmp, self._c_d1[index], out=tmp)
            np.add(out, tmp, out=out)


def _log32(x: np.ndarray) -> np.ndarray:
    """float32 log, correctly rounded (through float64); torch's may differ by one ulp."""
    return np.log(x.astype(np.float64)).astype(np.float32)


def _exp32(x: np.ndarray) -> np.ndarray:
    """float32 exp, correctly rounded (through float64)."""
    return np.exp(x.astype(np.float64)).astype(np.float32)
