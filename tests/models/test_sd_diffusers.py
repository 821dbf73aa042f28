"""Stable Diffusion from a diffusers directory: `save_pretrained` -> `mmedge export` -> the torch-free
pipeline draws the image diffusers' own StableDiffusionPipeline draws from the same latents."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("diffusers")
import torch
from diffusers_tiny import SCHEDULERS, write_tiny_sd

from mmedge import sdk
from mmedge.errors import ConfigError, InvalidInputError, UnsupportedError
from mmedge.export.exporter import export_model
from mmedge.runtime.image_generation import ImageGenerationPipeline
from mmedge.runtime.schedulers import MAX_STEPS

PROMPT = "a large red circle at the top left"


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> Callable[[str], tuple[Any, ImageGenerationPipeline, str, Path]]:
    """kind -> (diffusers pipeline, our pipeline of its export, kind, its directory), exported once."""
    done: dict[str, tuple[Any, ImageGenerationPipeline, str, Path]] = {}

    def get(kind: str) -> tuple[Any, ImageGenerationPipeline, str, Path]:
        if kind not in done:
            root = tmp_path_factory.mktemp(f"sd-{kind.replace('+', 'p')}")
            pipe = write_tiny_sd(root / "src", kind)
            export_model(root / "src", root / "pkg")
            ours = sdk.Pipeline(root / "pkg")
            assert isinstance(ours, ImageGenerationPipeline)
            done[kind] = pipe, ours, kind, root / "src"
        return done[kind]

    return get


@pytest.fixture(params=sorted(SCHEDULERS))
def exported(request, packages) -> tuple[Any, ImageGenerationPipeline, str, Path]:
    return packages(request.param)


@pytest.fixture
def ddim(packages) -> ImageGenerationPipeline:
    return packages("ddim")[1]


def _latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)


def _diffusers_image(
    pipe: Any, latents: np.ndarray, steps: int = 10, guidance: float = 7.5, **kw: Any
) -> np.ndarray:
    """diffusers' image of PROMPT from these initial latents, (H, W, 3) in [0, 1]."""
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=torch.from_numpy(latents),
        output_type="np",
        **kw,
    ).images[0]


def test_images_match_diffusers_for_each_scheduler(exported) -> None:
    pipe, ours, kind, _ = exported
    latents = _latents()
    ref = _diffusers_image(pipe, latents)
    got = ours.generate(PROMPT, steps=10, guidance=7.5, latents=latents)
    assert got.scheduler == kind and got.image.shape == ref.shape == (16, 16, 3)
    assert float(ref.std()) > 0.01  # a non-trivial image: the comparison could fail
    assert float(np.abs(got.image - ref).mean()) < 1e-3
    # a negative prompt and guidance off take diffusers' paths too
    ref = _diffusers_image(pipe, latents, 4, 3.0, negative_prompt="a small blue star")
    got = ours.generate(PROMPT, negative_prompt="a small blue star", steps=4, guidance=3.0, latents=latents)
    assert float(np.abs(got.image - ref).mean()) < 1e-3
    ref = _diffusers_image(pipe, latents, 3, 1.0)
    assert (
        float(np.abs(ours.generate(PROMPT, steps=3, guidance=1.0, latents=latents).image - ref).mean()) < 1e-3
    )


def test_a_text_pooled_timestep_embedding_matches_diffusers(tmp_path: Path) -> None:
    # addition_embed_type "text" pools the prompt's hidden states into the timestep embedding: no new
    # graph input, so it is accepted (sd-tiny conditions every resolution through it)
    pipe = write_tiny_sd(tmp_path / "src", "ddim", pooled_text=True)
    export_model(tmp_path / "src", tmp_path / "pkg")
    ours = sdk.Pipeline(tmp_path / "pkg")
    latents = _latents(1)
    ref = _diffusers_image(pipe, latents)
    got = ours.generate(PROMPT, steps=10, guidance=7.5, latents=latents)
    assert float(ref.std()) > 0.01
    assert float(np.abs(got.image - ref).mean()) < 1e-3
    # the pooled path carries the prompt: without it (zeroed projection) the image changes
    pipe.unet.add_embedding.proj.weight.data.zero_()
    pipe.unet.add_embedding.proj.bias.data.zero_()
    assert float(np.abs(_diffusers_image(pipe, latents) - ref).mean()) > 1e-2


def test_scheduler_override_matches_diffusers_from_config(exported) -> None:
    import diffusers

    pipe, ours, kind, src = exported
    other = next(k for k in sorted(SCHEDULERS) if k != kind)
    # as a user swaps the sampler of the saved directory: every setting the file states carries over
    saved = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    swapped = getattr(diffusers, SCHEDULERS[other]).from_config(saved)
    ref_pipe = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": swapped})
    latents = _latents(1)
    ref = ref_pipe(
        PROMPT, num_inference_steps=6, guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np"
    ).images[0]
    got = ours.generate(PROMPT, steps=6, guidance=5.0, latents=latents, scheduler=other)
    assert got.scheduler == other
    assert float(np.abs(got.image - ref).mean()) < 1e-3


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def test_image_to_image_matches_diffusers_for_each_scheduler(exported, monkeypatch) -> None:
    import diffusers
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img
    from PIL import Image

    pipe, ours, kind, _ = exported
    noise = _latents(2)
    # the posterior's mean, as the runtime takes (diffusers samples it), and the runtime's noise
    monkeypatch.setattr(img2img, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **_: torch.from_numpy(noise).reshape(shape))
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    image = _image(0)
    for strength, steps, guidance in ((0.6, 10, 7.5), (1.0, 4, 3.0), (0.35, 7, 1.0)):
        ref = ref_pipe(
            PROMPT,
            image=Image.fromarray(image),
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="np",
        ).images[0]
        seen: list[tuple[int, int]] = []
        got = ours.generate(
            PROMPT,
            image=image,
            strength=strength,
            steps=steps,
            guidance=guidance,
            latents=noise,
            progress=lambda done, total, seen=seen: seen.append((done, total)),
        )
        assert got.strength == strength and got.image.shape == ref.shape == (16, 16, 3)
        assert float(ref.std()) > 0.01
        assert float(np.abs(got.image - ref).mean()) < 1e-3, (kind, strength)
        ran = int(steps * strength)
        assert seen == [(i + 1, ran) for i in range(ran)]
    # the image matters: another one, same noise and settings, draws something else (by far more
    # than the parity tolerance; these random weights make blurry images)
    other = ours.generate(PROMPT, image=_image(1), strength=0.3, steps=10, guidance=7.5, latents=noise)
    again = ours.generate(PROMPT, image=image, strength=0.3, steps=10, guidance=7.5, latents=noise)
    assert float(np.abs(other.image - again.image).mean()) > 5e-3


def test_image_to_image_bad_input_is_refused(ddim) -> None:
    ours = ddim
    image = _image(0)
    for strength in (0, -0.5, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(InvalidInputError, match="strength"):
            ours.generate(PROMPT, image=image, strength=strength)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="runs no step"):
        ours.generate(PROMPT, image=image, strength=0.05, steps=10)
    with pytest.raises(InvalidInputError, match="shape"):
        ours.generate(PROMPT, image=image[..., :2])
    with pytest.raises(InvalidInputError, match="cannot load an image"):
        ours.generate(PROMPT, image=[[0]])
    with pytest.raises(InvalidInputError, match="height 32 differs"):
        ours.generate(PROMPT, image=image, height=32)
    with pytest.raises(InvalidInputError, match="multiple"):
        ours.generate(PROMPT, image=np.zeros((18, 16, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="outside"):
        ours.generate(PROMPT, image=np.zeros((64, 64, 3), np.uint8))


def test_seeds_are_reproducible_and_progress_is_reported(ddim) -> None:
    ours = ddim
    seen: list[tuple[int, int]] = []
    a = ours.generate(PROMPT, steps=3, seed=7, progress=lambda done, total: seen.append((done, total)))
    b = ours.generate(PROMPT, steps=3, seed=7)
    c = ours.generate(PROMPT, steps=3, seed=8)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    assert a.pixels.dtype == np.uint8 and a.pixels.shape == (16, 16, 3)


def test_bad_input_is_refused(ddim) -> None:
    ours = ddim
    for steps in (0, -1, MAX_STEPS + 1, 2.5, True):
        with pytest.raises(InvalidInputError, match="steps"):
            ours.generate(PROMPT, steps=steps)
    for guidance in (-0.5, float("nan"), 1e9):
        with pytest.raises(InvalidInputError, match="guidance"):
            ours.generate(PROMPT, guidance=guidance)
    bad = _latents()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        ours.generate(PROMPT, latents=bad)
    with pytest.raises(InvalidInputError, match="shape"):
        ours.generate(PROMPT, latents=np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(InvalidInputError, match="multiple"):
        ours.generate(PROMPT, height=18)  # the VAE halves, the U-Net halves once more: 4-pixel steps
    with pytest.raises(InvalidInputError, match="outside"):
        ours.generate(PROMPT, height=64)  # the U-Net's declared range is 2 to 16 latents (4 to 32 pixels)
    for prompt in ("", "   ", None):
        with pytest.raises(InvalidInputError, match="prompt"):
            ours.generate(prompt)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError):
        ours.generate(PROMPT, scheduler="pndm")


def test_a_prompt_longer_than_the_context_is_cut_and_says_so(ddim) -> None:
    ours = ddim
    long = " ".join([PROMPT] * 10)
    out = ours.generate(long, steps=2, seed=0)
    assert out.prompt_truncated and not ours.generate(PROMPT, steps=2, seed=0).prompt_truncated
    assert out.image.shape == (16, 16, 3)


def test_directory_problems_are_named(tmp_path: Path) -> None:
    root = tmp_path / "src"
    write_tiny_sd(root, "ddim")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(UnsupportedError, match="StableDiffusionXLPipeline"):
        export_model(root, tmp_path / "pkg")
    (root / "model_index.json").write_text(json.dumps(index))
    config = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(UnsupportedError, match="addition_embed_type"):
        export_model(root, tmp_path / "pkg")
    (root / "unet" / "config.json").write_text(json.dumps({**config, "not_a_setting": 1}))
    with pytest.raises(ConfigError, match="not_a_setting"):
        export_model(root, tmp_path / "pkg")


def test_an_unsupported_sampler_keeps_its_noise_schedule(tmp_path: Path, caplog) -> None:
    root = tmp_path / "src"
    write_tiny_sd(root, "ddim")
    cfg_path = root / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "PNDMScheduler", "skip_prk_steps": True}))
    manifest = export_model(root, tmp_path / "pkg")
    assert manifest.diffusion is not None
    assert manifest.diffusion.scheduler.kind == "dpmsolver++"
    assert manifest.diffusion.scheduler.beta_schedule == "scaled_linear"
    assert "PNDMScheduler" in caplog.text


def test_generate_image_cli_draws_and_redraws(packages, tmp_path: Path, capsys) -> None:
    from mmedge.runtime.images import load_image
    from mmedge.sdk.cli import main

    pkg = packages("ddim")[3].parent / "pkg"
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    args = ["generate-image", str(pkg), PROMPT, "--steps", "4", "--seed", "3", "--json"]
    assert main([*args, "--out", str(first)]) == 0
    drawn = json.loads(capsys.readouterr().out)
    assert drawn["strength"] is None and load_image(first).shape == (16, 16, 3)
    assert main([*args, "--out", str(second), "--image", str(first), "--strength", "0.5"]) == 0
    redrawn = json.loads(capsys.readouterr().out)
    assert redrawn["strength"] == 0.5 and redrawn["seed"] == 3
    ours = packages("ddim")[1]
    want = ours.generate(PROMPT, steps=4, seed=3, image=load_image(first), strength=0.5)
    assert np.array_equal(load_image(second), want.pixels)
    assert main([*args, "--out", str(second), "--image", str(first), "--strength", "1.5"]) != 0
    assert "strength" in capsys.readouterr().err
    assert main([*args, "--out", str(second), "--strength", "0.5"]) != 0  # no image to redraw
    assert "pass --image" in capsys.readouterr().err
