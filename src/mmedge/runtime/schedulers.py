"""Diffusion schedulers without torch: DDIM, Euler discrete and DPM-Solver++ (2M), in numpy.

They mirror diffusers 0.42.1's DDIMScheduler, EulerDiscreteScheduler and DPMSolverMultistepScheduler
(deterministic paths: DDIM with eta=0, Euler with s_churn=0): the same timesteps, initial noise scale,
input scaling and step arithmetic in float32, so a numpy pipeline's latents follow diffusers' to
float32 rounding. `SchedulerConfig` is the settings as data: read from a diffusers
`scheduler_config.json` (`from_diffusers`), stored in a manifest (`to_dict` / `from_dict`), and checked
when made: a setting the numpy steppers do not implement is refused by name (UnsupportedError), never
run differently; a malformed value is a ConfigError. It keeps every setting any of the three kinds
reads, whatever its own kind, because diffusers carries a config's keys when one scheduler is made
from another's config (`with_kind`). `make_scheduler` builds the stepper for a number of inference
steps (the steppers are in `scheduler_steps`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mmedge.errors import ConfigError, InvalidInputError, UnsupportedError
from mmedge.runtime.scheduler_steps import DDIM, DPMSolverPP, Euler, Scheduler

__all__ = [
    "DIFFUSERS_CLASSES",
    "IGNORED_KEYS",
    "MAX_STEPS",
    "SCHEDULER_KINDS",
    "Scheduler",
    "SchedulerConfig",
    "make_scheduler",
]

SCHEDULER_KINDS = ("ddim", "euler", "dpmsolver++")
DIFFUSERS_CLASSES = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpmsolver++",
}
MAX_STEPS = 1000  # inference steps: no sampler in use runs more, and diffusers' schedules have 1000 points
MAX_TRAIN_TIMESTEPS = 100_000  # bounds what a config can make us allocate (published models use 1000)
DEFAULT_SPACING = {"ddim": "leading", "euler": "linspace", "dpmsolver++": "linspace"}  # diffusers' defaults

_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "timestep_type": ("discrete", "continuous"),
    "solver_type": ("midpoint", "heun"),
}
_SPACINGS = ("leading", "trailing", "linspace")
_NUMBERS = ("beta_start", "beta_end", "clip_sample_range", "sigma_min", "sigma_max", "lambda_min_clipped")
_OPTIONAL = ("sigma_min", "sigma_max", "lambda_min_clipped")  # None: the schedule's own / no clipping
_FLAGS = (
    "rescale_betas_zero_snr", "clip_sample", "set_alpha_to_one", "use_karras_sigmas", "lower_order_final",
    "euler_at_final",
)  # fmt: skip

# diffusers keys that must hold one of these values (the only ones implemented) for the kind that reads
# them; a config made for another kind may hold anything there (that kind's class ignores them).
_COMMON_FIXED = {"trained_betas": (None,)}
_FIXED: dict[str, dict[str, tuple[Any, ...]]] = {
    "ddim": {**_COMMON_FIXED, "thresholding": (False,)},
    "euler": {
        **_COMMON_FIXED,
        "interpolation_type": ("linear",),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
    },
    "dpmsolver++": {
        **_COMMON_FIXED,
        "thresholding": (False,),
        "algorithm_type": ("dpmsolver++",),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "use_dynamic_shifting": (False,),
        # DDPM's fixed variances are no-ops here (diffusers only reads the learned ones)
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    },
}
# diffusers keys of the three classes that only matter under a setting refused above.
_INERT = frozenset({"dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type"})
# Keys ignored on purpose: config metadata, and settings of diffusers' other schedulers that stock
# pipelines' scheduler_config.json files carry (none of the three classes reads them).
IGNORED_KEYS = frozenset(
    {
        "_class_name", "_diffusers_version", "_use_default_values", "_name_or_path",
        "skip_prk_steps",  # PNDM (Stable Diffusion 1.x/2.x's stock scheduler)
        "predict_x0", "solver_p", "disable_corrector",  # UniPC
        "original_inference_steps", "timestep_scaling",  # LCM
    }
)  # fmt: skip


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusion scheduler's settings, named and defaulted as in diffusers; each kind reads its own."""

    kind: str  # one of SCHEDULER_KINDS
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: the kind's diffusers default (DEFAULT_SPACING)
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    # ddim
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    # euler and dpmsolver++
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    sigma_min: float | None = None  # Karras sigmas' range; None: the schedule's own
    sigma_max: float | None = None
    # euler
    timestep_type: str = "discrete"
    # dpmsolver++
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float | None = None  # None: no clipping (diffusers' -inf)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str):
            raise ConfigError(f"scheduler kind must be a string, got {_short(self.kind)}")
        if self.kind not in SCHEDULER_KINDS:
            raise UnsupportedError(
                f"scheduler kind {self.kind!r} is not supported; accepted: {SCHEDULER_KINDS}"
            )
        self._int("num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS)
        self._int("steps_offset", 0, self.num_train_timesteps - 1)
        self._int("solver_order", 1, 3)
        if self.solver_order == 3 and self.kind == "dpmsolver++":
            raise UnsupportedError("scheduler setting solver_order=3 is not implemented; accepted: 1, 2")
        for name in _NUMBERS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"scheduler setting {name} must be a finite number, got {_short(value)}")
            object.__setattr__(self, name, float(value))  # JSON may give 1 for 1.0
        if not 0 < self.beta_start <= self.beta_end < 1:  # beta 0 at t=0 makes sigma 0: Euler divides by it
            raise ConfigError(
                f"scheduler betas must satisfy 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, "
                f"beta_end={self.beta_end}"
            )
        for name in ("clip_sample_range", "sigma_min", "sigma_max"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"scheduler setting {name} must be positive, got {getattr(self, name)}")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ConfigError(
                f"scheduler sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max}"
            )
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"scheduler setting {name} must be true or false, got {_short(getattr(self, name))}"
                )
        choices = {**_CHOICES, "timestep_spacing": _SPACINGS}
        for name, accepted in choices.items():
            value = getattr(self, name)
            if value is None and name == "timestep_spacing":
                continue
            if not isinstance(value, str):
                raise ConfigError(f"scheduler setting {name} must be a string, got {_short(value)}")
            if value not in accepted:
                raise UnsupportedError(
                    f"scheduler setting {name}={value!r} is not supported; accepted: {accepted}"
                )

    def _int(self, name: str, low: int, high: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                f"scheduler setting {name} must be an int in [{low}, {high}], got {_short(value)}"
            )

    @property
    def spacing(self) -> str:
        """The timestep spacing this kind runs with (`timestep_spacing`, or the kind's default)."""
        return self.timestep_spacing or DEFAULT_SPACING[self.kind]

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], kind: str | None = None) -> SchedulerConfig:
        """Settings from a diffusers `scheduler_config.json` dict, for its `_class_name` or for `kind`."""
        if not isinstance(config, Mapping):
            raise ConfigError(
                f"a diffusers scheduler config must be a JSON object, got {type(config).__name__}"
            )
        if kind is None:
            name = config.get("_class_name")
            if not isinstance(name, str) or name not in DIFFUSERS_CLASSES:
                raise UnsupportedError(
                    f"diffusers scheduler class {_short(name)} is not supported; accepted: "
                    f"{', '.join(DIFFUSERS_CLASSES)} (or name a kind, one of {SCHEDULER_KINDS}, to run this "
                    "config with that scheduler)"
                )
            kind = DIFFUSERS_CLASSES[name]
        elif kind not in SCHEDULER_KINDS:
            raise UnsupportedError(f"scheduler kind {kind!r} is not supported; accepted: {SCHEDULER_KINDS}")
        # diffusers drops the keys a live config lists as defaulted, so each class takes its own default
        defaulted = config.get("_use_default_values") or ()
        fields = {f.name for f in dataclasses.fields(cls)} - {"kind"}
        fixed = {key for table in _FIXED.values() for key in table}
        values: dict[str, Any] = {}
        for key, value in config.items():
            if key in IGNORED_KEYS or key in _INERT or (isinstance(defaulted, list) and key in defaulted):
                continue
            value = _from_diffusers_value(kind, key, value)
            if key in fields:
                values[key] = value
            elif key in _FIXED[kind]:
                accepted = _FIXED[kind][key]
                if not any(value is a if a is None or isinstance(a, bool) else value == a for a in accepted):
                    raise UnsupportedError(
                        f"scheduler setting {key}={_short(value)} is not supported by the numpy {kind} scheduler; "
                        f"accepted: {', '.join(map(repr, accepted))}"
                    )
            elif key not in fixed:  # another kind's refusable setting: its class would read it, not this one
                raise ConfigError(
                    f"unknown diffusers scheduler setting {key!r}; accepted: {', '.join(sorted(fields | fixed))}; "
                    f"ignored: {', '.join(sorted(IGNORED_KEYS | _INERT))}"
                )
        return cls(kind=kind, **values)

    def with_kind(self, kind: str) -> SchedulerConfig:
        """The same settings run by another kind, as diffusers' `OtherScheduler.from_config(config)`."""
        if kind not in SCHEDULER_KINDS:
            raise UnsupportedError(f"scheduler kind {kind!r} is not supported; accepted: {SCHEDULER_KINDS}")
        return dataclasses.replace(self, kind=kind)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, as JSON-ready values (`from_dict` reads them back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SchedulerConfig:
        """The inverse of `to_dict` (missing settings take their defaults); an unknown key is a ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a scheduler config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown scheduler config keys {unknown}; accepted: {', '.join(sorted(names))}"
            )
        if "kind" not in data:
            raise ConfigError(f"a scheduler config needs a 'kind', one of {SCHEDULER_KINDS}")
        return cls(**data)


def _short(value: Any) -> str:
    """A value for an error message, cut short (trained_betas lists run to 1000 numbers)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _from_diffusers_value(kind: str, key: str, value: Any) -> Any:
    """A diffusers value in this module's terms (its aliases and its nulls for 'off')."""
    if key == "use_karras_sigmas" and value is None:
        return False  # diffusers' EulerDiscreteScheduler types it bool | None
    if key == "lambda_min_clipped" and isinstance(value, float) and value == -math.inf:
        return None
    if key == "prediction_type" and kind == "euler" and value == "original_sample":
        return "sample"  # Euler's alias
    if key == "solver_type" and value in ("logrho", "bh1", "bh2"):
        return "midpoint"  # DPMSolverMultistepScheduler maps DEIS's and UniPC's solver types so
    if key == "algorithm_type" and value == "deis":
        return "dpmsolver++"  # and DEIS's algorithm
    return value


def make_scheduler(config: SchedulerConfig, steps: int) -> Scheduler:
    """The stepper for `config` over `steps` inference steps (1 to MAX_STEPS, at most the training steps)."""
    most = min(MAX_STEPS, config.num_train_timesteps)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
        raise InvalidInputError(
            f"inference steps must be an int in [1, {most}] (MAX_STEPS {MAX_STEPS}, num_train_timesteps "
            f"{config.num_train_timesteps}), got {steps!r}"
        )
    if config.kind == "ddim":
        return DDIM(config, steps)
    if config.kind == "euler":
        return Euler(config, steps)
    return DPMSolverPP(config, steps)
