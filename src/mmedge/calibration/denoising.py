"""Calibration data and the image-level metric of an image-generation package.

A U-Net's activations depend on the timestep (early steps see almost pure noise, late ones an
almost clean image), so its INT8 ranges come from inputs collected along real denoising
trajectories of the fp32 package: every step of a few prompts, with classifier-free guidance as
the runtime runs it. The VAE decoder gets the trajectories' final latents. Whether quantization
hurts is judged on the final image, against the fp32 image drawn from the same seed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from mmedge.errors import UnbuiltPrecisionWarning
from mmedge.runtime.package import Package

CALIBRATION_STEPS = 10  # steps per trajectory: ranges across the whole noise schedule
METRIC_IMAGES = 4  # prompts per trajectory set, and images drawn per precision for the image-level metric


def _pipeline(pkg: Package, precision: str) -> Any:
    from mmedge.runtime.components import ComponentRunner
    from mmedge.runtime.image_generation import ImageGenerationPipeline

    return ImageGenerationPipeline(ComponentRunner(pkg, precision=precision))


@contextlib.contextmanager
def _unbuilt_quietly() -> Iterator[None]:
    """A staged package is built after calibration: its graphs run unbuilt here, as expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnbuiltPrecisionWarning)
        yield


def _steps(pkg: Package) -> int:
    section = pkg.manifest.diffusion
    return min(CALIBRATION_STEPS, section.steps if section is not None else CALIBRATION_STEPS)


def trajectory_feeds(
    pkg: Package, prompts: list[str], seed: int = 0
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per component, the inputs the fp32 package gives it while drawing `prompts` (one feed per
    denoising step for the denoiser, one per image for the VAE decoder)."""
    pipe = _pipeline(pkg, "fp32")
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}

    def observe(component: str, inputs: dict[str, np.ndarray]) -> None:
        feeds.setdefault(component, []).append({k: v.copy() for k, v in inputs.items()})

    with _unbuilt_quietly():
        for i, prompt in enumerate(prompts):
            pipe.generate(prompt, steps=_steps(pkg), seed=seed + i, observe=observe)
    return feeds


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (infinite when they are equal)."""
    mse = float(np.mean((reference.astype(np.float64) - image.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def image_metric(pkg: Package, prompts: list[str], precision: str = "auto", seed: int = 0) -> dict[str, Any]:
    """PSNR and mean absolute error of the images drawn at `precision` against fp32 ones drawn from
    the same prompts and seeds (the package's guidance; at most CALIBRATION_STEPS steps)."""
    prompts = prompts[:METRIC_IMAGES]
    ref, test = _pipeline(pkg, "fp32"), _pipeline(pkg, precision)
    steps = _steps(pkg)
    psnrs, maes = [], []
    with _unbuilt_quietly():
        for i, prompt in enumerate(prompts):
            a = ref.generate(prompt, seed=seed + i, steps=steps).image
            b = test.generate(prompt, seed=seed + i, steps=steps).image
            psnrs.append(psnr(a, b))
            maes.append(float(np.abs(a - b).mean()))
    finite = [p for p in psnrs if math.isfinite(p)]
    return {
        "images": len(prompts),
        "steps": steps,
        "psnr_db_median": round(float(np.median(finite)), 2) if finite else None,
        "psnr_db_min": round(min(finite), 2) if finite else None,
        "identical_images": len(psnrs) - len(finite),
        "mae_mean": round(float(np.mean(maes)), 5),
    }
