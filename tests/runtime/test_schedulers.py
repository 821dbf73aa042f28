"""numpy schedulers (DDIM, Euler, DPM-Solver++) against diffusers' own, step by step; config checks."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from mmedge.errors import ConfigError, InvalidInputError, UnsupportedError
from mmedge.runtime.schedulers import (
    DIFFUSERS_CLASSES,
    MAX_STEPS,
    SCHEDULER_KINDS,
    SchedulerConfig,
    make_scheduler,
)

# Stable Diffusion 1.5's scheduler_config.json (its class is PNDM, so a kind must be named)
SD15: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
COMMON: dict[str, dict[str, Any]] = {
    "sd15": SD15,
    "sd15-trailing": {**SD15, "timestep_spacing": "trailing"},
    "sd15-linspace": {**SD15, "timestep_spacing": "linspace"},
    "sd15-v-trailing": {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "linear-defaults": {},
    "cosine-sample-leading": {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "sample",
        "timestep_spacing": "leading",
    },
    "zero-snr-v": {
        **SD15,
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
    },
}
EXTRA: dict[str, dict[str, dict[str, Any]]] = {
    "ddim": {"clip": {**SD15, "clip_sample": True, "clip_sample_range": 0.5}},
    "euler": {
        "karras": {**SD15, "use_karras_sigmas": True},
        "karras-range": {**SD15, "use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0},
        "continuous-v": {**SD15, "prediction_type": "v_prediction", "timestep_type": "continuous"},
        "final-sigma-min": {**SD15, "final_sigmas_type": "sigma_min", "timestep_spacing": "linspace"},
    },
    "dpmsolver++": {
        "karras": {**SD15, "use_karras_sigmas": True},
        "karras-sigma-min": {**SD15, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
        # DPMSolverMultistepScheduler has no sigma_min/sigma_max but reads them when a config has them
        "karras-range": {**SD15, "use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0},
        "final-sigma-min": {**SD15, "final_sigmas_type": "sigma_min"},
        "heun": {**SD15, "solver_type": "heun"},
        "no-lower-order-final": {**SD15, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        "euler-at-final": {**SD15, "euler_at_final": True, "final_sigmas_type": "sigma_min"},
        "first-order": {**SD15, "solver_order": 1},
        "lambda-clipped": {**SD15, "lambda_min_clipped": -5.1, "timestep_spacing": "trailing"},
    },
}
CASES = [(kind, name, d) for kind in SCHEDULER_KINDS for name, d in {**COMMON, **EXTRA[kind]}.items()]
CLASS_OF = {kind: cls for cls, kind in DIFFUSERS_CLASSES.items()}
SHAPE = (1, 4, 8, 8)


def _reference(kind: str, config: dict[str, Any], steps: int) -> Any:
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    ref = getattr(diffusers, CLASS_OF[kind]).from_config(config)
    ref.set_timesteps(steps)
    return ref


def _fake_model(sample: np.ndarray, t: float, noise: np.ndarray) -> np.ndarray:
    """A deterministic 'U-Net': depends on the sample and the step, as a real one does."""
    return np.float32(0.3) * sample + np.float32(0.1 * np.sin(t)) * noise


def _compare(kind: str, config: dict[str, Any], steps: int, upto: int | None = None) -> float:
    """`_run_both` on diffusers' scheduler and ours made from the same config dict."""
    ref = _reference(kind, config, steps)
    return _run_both(ref, SchedulerConfig.from_diffusers(config, kind=kind), steps, upto)


def _run_both(ref: Any, config: SchedulerConfig, steps: int, upto: int | None = None) -> float:
    """Runs diffusers' scheduler `ref` and ours side by side (the first `upto` steps); asserts they
    agree; returns the largest difference relative to the sample's scale."""
    import torch

    ours = make_scheduler(config, steps)
    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == np.float32 and len(ours.timesteps) == min(steps, len(ref_t))
    upto = len(ref_t) if upto is None else upto
    np.testing.assert_allclose(ours.timesteps[:upto], ref_t[:upto], rtol=0, atol=1e-4)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    rng = np.random.default_rng(0)
    start, noise = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    x = start * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(start) * ref.init_noise_sigma
    worst = 0.0
    for i, t in enumerate(ref.timesteps[:upto]):
        scaled_ref = ref.scale_model_input(x_ref, t).numpy()
        np.testing.assert_allclose(ours.scale_model_input(x, i), scaled_ref, rtol=1e-4, atol=1e-5)
        out_ref = ref.step(
            torch.from_numpy(_fake_model(x_ref.numpy(), float(t), noise)), t, x_ref
        ).prev_sample
        x = ours.step(_fake_model(x, float(ours.timesteps[i]), noise), i, x)  # fed back as is: no copy
        np.testing.assert_allclose(x, out_ref.numpy(), rtol=1e-4, atol=1e-5)
        # relative to the sample's scale: float32 rounding apart (torch's sqrt and log are MKL's)
        worst = max(worst, float(np.abs(x - out_ref.numpy()).max() / np.abs(out_ref.numpy()).max()))
        assert worst < 3e-5
        x_ref = out_ref
    return worst


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
@pytest.mark.parametrize(("kind", "name", "config"), CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_matches_diffusers(kind: str, name: str, config: dict[str, Any], steps: int) -> None:
    _compare(kind, config, steps)


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
def test_trailing_drops_diffusers_extra_timestep(kind: str) -> None:
    # diffusers 0.42.1's trailing spacing gives 62 timesteps (the last -1) for 61 steps of 1000;
    # ours stops at 61 and agrees with diffusers' first 60 steps (the 61st ends at sigma 0 instead).
    assert len(_reference(kind, COMMON["sd15-trailing"], 61).timesteps) == 62
    _compare(kind, COMMON["sd15-trailing"], 61, upto=61 if kind == "ddim" else 60)
    assert make_scheduler(SchedulerConfig.from_diffusers(SD15, kind=kind), 61).steps == 61


def test_repeated_noise_level_refused() -> None:
    karras_heun = {**SD15, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_type": "heun"}
    with pytest.raises(InvalidInputError, match="repeat the noise level"):
        make_scheduler(SchedulerConfig.from_diffusers(karras_heun, kind="dpmsolver++"), 25)
    # DPM-Solver's leading spacing over steps + 1 points gives every timestep the same value at 1000 steps
    with pytest.raises(InvalidInputError, match="repeat the first timestep"):
        make_scheduler(SchedulerConfig(kind="dpmsolver++", timestep_spacing="leading"), 1000)
    with pytest.raises(InvalidInputError, match=r"repeat the noise level .* use fewer steps$"):
        make_scheduler(SchedulerConfig(kind="dpmsolver++"), 1000)  # linspace rounds two timesteps together
    with pytest.raises(InvalidInputError, match="past the last trained"):
        make_scheduler(SchedulerConfig.from_diffusers(SD15, kind="ddim"), 1000)


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("ddim", "thresholding", True),
        ("dpmsolver++", "thresholding", True),
        ("ddim", "trained_betas", [0.1] * 1000),
        ("euler", "interpolation_type", "log_linear"),
        ("euler", "use_exponential_sigmas", True),
        ("euler", "use_beta_sigmas", True),
        ("dpmsolver++", "use_lu_lambdas", True),
        ("dpmsolver++", "use_flow_sigmas", True),
        ("dpmsolver++", "use_dynamic_shifting", True),
        ("dpmsolver++", "algorithm_type", "sde-dpmsolver++"),
        ("dpmsolver++", "algorithm_type", "dpmsolver"),
        ("dpmsolver++", "variance_type", "learned_range"),
        ("dpmsolver++", "solver_order", 3),
        ("dpmsolver++", "prediction_type", "flow_prediction"),
        ("ddim", "beta_schedule", "sigmoid"),
        ("euler", "timestep_spacing", "uniform"),
    ],
)
def test_unimplemented_settings_refused(kind: str, key: str, value: Any) -> None:
    with pytest.raises(UnsupportedError, match=key) as err:
        SchedulerConfig.from_diffusers({**SD15, key: value}, kind=kind)
    assert "accepted" in str(err.value) and (
        repr(value)[:20] in str(err.value) or str(value) in str(err.value)
    )


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
def test_reads_configs_diffusers_saves(kind: str) -> None:
    # what save_pretrained writes: every key of the class, -Infinity included
    saved = json.loads(_reference(kind, SD15, 1).to_json_string())
    cfg = SchedulerConfig.from_diffusers(saved)
    assert cfg.kind == kind and cfg.timestep_spacing == cfg.spacing  # saved explicitly
    assert dataclasses.replace(cfg, timestep_spacing=None) == SchedulerConfig.from_diffusers(SD15, kind=kind)
    assert cfg.beta_schedule == "scaled_linear" and cfg.steps_offset == 1


def test_class_name_picks_kind_or_is_refused() -> None:
    for cls, kind in DIFFUSERS_CLASSES.items():
        assert SchedulerConfig.from_diffusers({"_class_name": cls}).kind == kind
    with pytest.raises(UnsupportedError, match=r"PNDMScheduler.*DDIMScheduler"):
        SchedulerConfig.from_diffusers(SD15)
    with pytest.raises(UnsupportedError, match="heun"):
        SchedulerConfig.from_diffusers(SD15, kind="heun")


def test_diffusers_defaults_and_ignored_keys() -> None:
    # per-class defaults: DDIM spaces "leading" and clips, Euler and DPM-Solver space "linspace"
    ddim = SchedulerConfig.from_diffusers({"_class_name": "DDIMScheduler"})
    assert (ddim.timestep_spacing, ddim.spacing, ddim.clip_sample, ddim.set_alpha_to_one) == (
        None, "leading", True, True
    )  # fmt: skip
    assert SchedulerConfig.from_diffusers({}, kind="euler").spacing == "linspace"
    # a live config's defaulted keys are dropped (diffusers' _use_default_values)
    live = {"timestep_spacing": "linspace", "steps_offset": 1, "_use_default_values": ["timestep_spacing"]}
    assert SchedulerConfig.from_diffusers(live, kind="ddim").spacing == "leading"
    # settings another class reads and ours refuses are that class's business, as in diffusers
    dpm_only = {**SD15, "use_lu_lambdas": True, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    assert SchedulerConfig.from_diffusers(dpm_only, kind="ddim").solver_order == 3
    euler = SchedulerConfig.from_diffusers(
        {**SD15, "sigma_min": 0.1, "use_karras_sigmas": None}, kind="euler"
    )
    assert euler.sigma_min == 0.1 and euler.use_karras_sigmas is False
    # aliases diffusers maps: DEIS's algorithm, UniPC's solver type, -inf lambda clipping
    dpm = SchedulerConfig.from_diffusers(
        {"algorithm_type": "deis", "solver_type": "bh2", "lambda_min_clipped": float("-inf")},
        kind="dpmsolver++",
    )
    assert (dpm.solver_type, dpm.lambda_min_clipped) == ("midpoint", None)
    inert = {"dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0, "flow_shift": 3.0}
    assert SchedulerConfig.from_diffusers(inert, kind="dpmsolver++").kind == "dpmsolver++"


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"beta_start": "abc"}, "beta_start"),
        ({"beta_start": True}, "beta_start"),
        ({"beta_start": 0}, "0 < beta_start"),
        ({"beta_end": float("nan")}, "beta_end"),
        ({"num_train_timesteps": -5}, "num_train_timesteps"),
        ({"num_train_timesteps": 1000.0}, "num_train_timesteps"),
        ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start <= beta_end"),
        ({"beta_end": 1.0}, "beta_end < 1"),
        ({"steps_offset": -1}, "steps_offset"),
        ({"clip_sample": "yes"}, "clip_sample"),
        ({"clip_sample_range": 0}, "clip_sample_range"),
        ({"prediction_type": 3}, "prediction_type"),
        ({"prediction_typ": "epsilon"}, "unknown diffusers scheduler setting 'prediction_typ'"),
    ],
)
def test_malformed_values(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SchedulerConfig.from_diffusers(config, kind="ddim")


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="sigma_min"):
        SchedulerConfig(kind="euler", sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ConfigError, match="JSON object"):
        SchedulerConfig.from_diffusers(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError, match="kind"):
        SchedulerConfig(kind="pndm")


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
def test_dict_round_trip(kind: str) -> None:
    extra = {"lambda_min_clipped": -5.1, "use_karras_sigmas": True} if kind == "dpmsolver++" else {}
    cfg = SchedulerConfig.from_diffusers({**SD15, "prediction_type": "v_prediction", **extra}, kind=kind)
    data = json.loads(json.dumps(cfg.to_dict(), allow_nan=False))
    assert SchedulerConfig.from_dict(data) == cfg
    assert SchedulerConfig.from_dict(SchedulerConfig(kind=kind).to_dict()) == SchedulerConfig(kind=kind)
    with pytest.raises(ConfigError, match="unknown scheduler config keys"):
        SchedulerConfig.from_dict({**data, "eta": 0.5})
    with pytest.raises(ConfigError, match="kind"):
        SchedulerConfig.from_dict({k: v for k, v in data.items() if k != "kind"})


def test_with_kind_keeps_every_setting() -> None:
    dpm = SchedulerConfig.from_diffusers({**SD15, "use_karras_sigmas": True}, kind="dpmsolver++")
    euler = dpm.with_kind("euler")
    assert (euler.kind, euler.beta_schedule, euler.steps_offset, euler.use_karras_sigmas) == (
        "euler", "scaled_linear", 1, True
    )  # fmt: skip
    assert euler.with_kind("ddim").clip_sample is False  # SD 1.5's, carried through Euler
    assert euler.spacing == "linspace" and euler.with_kind("ddim").spacing == "leading"  # each its default
    with pytest.raises(UnsupportedError, match="solver_order=3"):
        SchedulerConfig(kind="ddim", solver_order=3).with_kind("dpmsolver++")
    with pytest.raises(UnsupportedError):
        dpm.with_kind("lms")


SWAP = {**SD15, "use_karras_sigmas": True, "sigma_min": 0.1, "lower_order_final": False}


@pytest.mark.parametrize(
    "config", [SWAP, {**SWAP, "timestep_spacing": "trailing"}], ids=["default", "trailing"]
)
@pytest.mark.parametrize("target", SCHEDULER_KINDS)
@pytest.mark.parametrize("source", SCHEDULER_KINDS)
def test_with_kind_as_diffusers_swaps(source: str, target: str, config: dict[str, Any]) -> None:
    # diffusers: Target.from_config(Source.from_config(json).config), which carries the json's keys
    swapped = getattr(pytest.importorskip("diffusers"), CLASS_OF[target]).from_config(
        _reference(source, config, 1).config
    )
    swapped.set_timesteps(20)
    _run_both(swapped, SchedulerConfig.from_diffusers(config, kind=source).with_kind(target), 20)


@pytest.mark.parametrize("steps", [0, MAX_STEPS + 1, 51, True, 2.0])
def test_step_count_checked(steps: Any) -> None:
    with pytest.raises(InvalidInputError, match="inference steps"):
        make_scheduler(SchedulerConfig(kind="ddim", num_train_timesteps=50), steps)


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
def test_step_order_and_shapes(kind: str) -> None:
    sched = make_scheduler(SchedulerConfig(kind=kind, timestep_spacing="trailing"), 5)
    x = np.ones(SHAPE, np.float32)
    first = sched.step(0.1 * x, 0, x).copy()
    with pytest.raises(InvalidInputError, match="out of order"):
        sched.step(0.1 * x, 2, x)
    for bad in (5, -1, True, 1.0):
        with pytest.raises(InvalidInputError, match="index"):
            sched.step(0.1 * x, bad, x)
    with pytest.raises(InvalidInputError, match="shape"):
        sched.step(np.ones((1, 4, 8, 7), np.float32), 1, x)
    with pytest.raises(InvalidInputError, match="changed mid-run"):
        sched.step(np.ones((1, 4, 4, 4), np.float32), 1, np.ones((1, 4, 4, 4), np.float32))
    sched.step(0.1 * x, 1, x)
    np.testing.assert_array_equal(sched.step(0.1 * x, 0, x), first)  # index 0 starts a new run
    with pytest.raises(ValueError):
        sched.timesteps[0] = 1.0  # the schedule is read-only


@pytest.mark.parametrize("begin", [1, 4, 9])
@pytest.mark.parametrize(
    ("kind", "name", "config"), [c for c in CASES if c[1] in ("sd15", "sd15-v-trailing")]
)
def test_begin_index_and_add_noise_match_diffusers(
    kind: str, name: str, config: dict[str, Any], begin: int
) -> None:
    # image-to-image: noise a clean sample to the begin index's level, then run from there
    import torch

    ref, ours = (
        _reference(kind, config, 10),
        make_scheduler(SchedulerConfig.from_diffusers(config, kind=kind), 10),
    )
    if hasattr(ref, "set_begin_index"):  # DDIM steps by timestep value and has none
        ref.set_begin_index(begin)
    ours.set_begin_index(begin)
    rng = np.random.default_rng(1)
    clean, noise = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    x_ref = ref.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), ref.timesteps[begin : begin + 1])
    x = ours.add_noise(clean, noise)
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=1e-5)
    for i in range(begin, 10):
        t = ref.timesteps[i]
        model_ref = _fake_model(ref.scale_model_input(x_ref, t).numpy(), float(t), noise)
        x_ref = ref.step(torch.from_numpy(model_ref), t, x_ref).prev_sample
        x = ours.step(_fake_model(ours.scale_model_input(x, i), float(ours.timesteps[i]), noise), i, x)
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidInputError, match=f"steps run {begin}, {begin + 1}"):
        ours.step(noise, begin - 1, x)  # a run starts at the begin index, not before it


def test_no_torch_import() -> None:
    code = "import sys, mmedge.runtime.schedulers; sys.exit(bool({'torch', 'diffusers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
