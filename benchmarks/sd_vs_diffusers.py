"""An SD-1.5-shaped text-to-image pipeline, mmedge vs diffusers eager, on random weights.

Stable Diffusion 1.5's U-Net (860M parameters: blocks 320/640/1280/1280, 2 layers per block,
cross-attention width 768) and VAE, with a CLIP ViT-L-sized text encoder (width 768, 12 layers)
over a small local tokenizer, saved with diffusers' `save_pretrained`; mmedge exports it, calibrates
the U-Net and VAE decoder to INT8 on denoising trajectories of 4 synthetic captions
(`--target-cosine 0`: every Conv/MatMul quantized, the cosine and the image PSNR recorded as
measured) and builds for ORT. Latents are 32x32 (256x256 images), a reduced resolution. Timed in
one process, medians of alternating runs, 2 threads by default:

- step: one U-Net step at batch 2 (classifier-free guidance), ours fp32 and INT8 against diffusers'
  `UNet2DConditionModel` eager;
- e2e: a whole 20-step generation at guidance 7.5 from the same latents (text encoder, 20 U-Net
  steps, VAE decoder; DDIM on both sides), ours fp32 and INT8 against `StableDiffusionPipeline`.

    .venv/bin/python benchmarks/sd_vs_diffusers.py --workdir /tmp/sd-bench [--threads 2] [--runs 3]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
from vs_transformers import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # diffusers_tiny's schedule
LATENT, CONTEXT, STEPS, GUIDANCE = 32, 77, 20, 7.5
PROMPT = "a large red circle at the top left"


def _pipeline():
    import diffusers
    import torch
    from diffusers_tiny import SD15_SCHEDULE, text_parts

    from mmedge.models.sd.modeling import SD15_VAE

    torch.manual_seed(0)
    tokenizer, text = text_parts(CONTEXT, hidden=768, layers=12, heads=12, intermediate=3072)
    unet = diffusers.UNet2DConditionModel(sample_size=LATENT, cross_attention_dim=768)
    vae = diffusers.AutoencoderKL(**SD15_VAE, latent_channels=4)
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=diffusers.DDIMScheduler.from_config(SD15_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def setup(work: Path) -> None:
    from mmedge.calibration.package import calibrate_package
    from mmedge.export.exporter import export_model

    _pipeline().save_pretrained(work / "src", safe_serialization=True)
    export_model(work / "src", work / "pkg", progress=print)
    calibrate_package(work / "pkg", "train-shapes:4", samples=4, target_cosine=0.0, progress=print)


def _median(fn, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), [round(min(times), 3), round(max(times), 3)]


def bench(work: Path, threads: int, runs: int) -> dict:
    import diffusers
    import torch

    from mmedge import sdk
    from mmedge.errors import UnbuiltPrecisionWarning

    torch.set_num_threads(threads)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(work / "src")
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnbuiltPrecisionWarning)
        ours = {p: sdk.Pipeline(work / "pkg", precision=p, threads=threads) for p in ("fp32", "int8")}
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    sample = rng.standard_normal((2, 4, LATENT, LATENT)).astype(np.float32)
    cond = rng.standard_normal((2, CONTEXT, 768)).astype(np.float32)
    timestep = np.full(2, 500.0, np.float32)
    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": cond}
    sessions = {p: o.runner.session(o.denoiser) for p, o in ours.items()}
    t_sample, t_cond, t_step = (torch.from_numpy(x) for x in (sample, cond, timestep))

    def theirs_step() -> None:
        with torch.inference_mode():
            pipe.unet(t_sample, t_step, t_cond)

    out: dict = {"threads": threads, "runs": runs, "latent": LATENT, "steps": STEPS}
    for session in sessions.values():
        session.run(feeds)  # warm-up
    theirs_step()
    step = {p: _median(lambda s=s: s.run(feeds), runs) for p, s in sessions.items()}
    ref = _median(theirs_step, runs)
    out["unet_step_s"] = {
        "diffusers_eager": round(ref[0], 3),
        "diffusers_spread": ref[1],
        **{f"mmedge_{p}": round(t, 3) for p, (t, _) in step.items()},
        **{f"mmedge_{p}_spread": s for p, (_, s) in step.items()},
        **{f"speedup_{p}": round(ref[0] / t, 2) for p, (t, _) in step.items()},
    }

    def theirs_e2e() -> np.ndarray:
        with torch.inference_mode():
            return pipe(
                PROMPT,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                latents=torch.from_numpy(latents),
                output_type="np",
            ).images[0]

    def ours_e2e(p: str) -> np.ndarray:
        return (
            ours[p].generate(PROMPT, steps=STEPS, guidance=GUIDANCE, latents=latents, scheduler="ddim").image
        )

    images = {"diffusers": theirs_e2e(), **{p: ours_e2e(p) for p in ours}}
    e2e = {
        "diffusers": _median(theirs_e2e, runs),
        **{p: _median(lambda p=p: ours_e2e(p), runs) for p in ours},
    }
    out["generation_20_steps_s"] = {
        **{k: round(t, 2) for k, (t, _) in e2e.items()},
        **{f"{k}_spread": s for k, (_, s) in e2e.items()},
        **{f"speedup_{p}": round(e2e["diffusers"][0] / e2e[p][0], 2) for p in ours},
    }
    out["image_mae_vs_diffusers"] = {p: float(np.abs(images[p] - images["diffusers"]).mean()) for p in ours}
    m = ours["int8"].runner.manifest
    out["int8_records"] = {
        name: c.precisions["int8"].parity for name, c in m.components.items() if "int8" in c.precisions
    }
    return out


if __name__ == "__main__":
    main(__doc__, setup, bench)
