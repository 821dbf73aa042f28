"""`mmedge generate-image`: its options and what it does (text-to-image packages; with --image,
image-to-image)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from mmedge.errors import InvalidInputError
from mmedge.runtime.diffusion_config import MAX_GUIDANCE
from mmedge.runtime.schedulers import MAX_STEPS, SCHEDULER_KINDS


def add_verb(
    add: Callable[[str, Callable[[argparse.Namespace], object], str], argparse.ArgumentParser],
    runtime_opts: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Declare `mmedge generate-image` with `sdk.cli`'s verb factory and runtime options."""
    sp = add(
        "generate-image",
        cmd_generate_image,
        "draw an image of a prompt with a text-to-image package, or redraw one (--image)",
    )
    runtime_opts(sp)
    sp.add_argument("prompt", help="what to draw; cut to the text encoder's context (a warning says so)")
    sp.add_argument("--out", required=True, help="PNG file to write (atomically)")
    sp.add_argument(
        "--steps", type=int, default=None, help=f"denoising steps, 1 to {MAX_STEPS} (default: the package's)"
    )
    sp.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g}; 1 or less turns guidance off "
        "(default: the package's)",
    )
    sp.add_argument("--negative-prompt", default=None, help="what guidance steers away from (default: empty)")
    sp.add_argument("--seed", type=int, default=None, help="initial noise seed (default: random)")
    sp.add_argument("--height", type=int, default=None, help="pixels (default: the package's trained size)")
    sp.add_argument("--width", type=int, default=None, help="pixels (default: the package's trained size)")
    sp.add_argument(
        "--scheduler",
        choices=SCHEDULER_KINDS,
        default=None,
        help="sampler, with the package's noise schedule (default: the package's)",
    )
    sp.add_argument(
        "--image",
        default=None,
        help="image-to-image: start from this image file (its size is the result's) instead of pure noise",
    )
    sp.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --image: how much of it is redrawn, in (0, 1]: the image is noised that far into the "
        "schedule and int(steps x strength) steps run; near 0 stays close to the image, 1 draws almost "
        "anew (default: 0.8, as diffusers)",
    )


def cmd_generate_image(a: argparse.Namespace) -> object:
    from mmedge.sdk.verbs import _pipeline

    if a.strength is not None and a.image is None:
        raise InvalidInputError("--strength applies to image-to-image: pass --image too")
    p = _pipeline(a)
    bar = _progress_bar(a.json)
    try:
        out = p.generate(
            a.prompt,
            negative_prompt=a.negative_prompt,
            steps=a.steps,
            guidance=a.guidance,
            seed=a.seed,
            height=a.height,
            width=a.width,
            scheduler=a.scheduler,
            progress=bar,
            image=a.image,
            strength=0.8 if a.strength is None else a.strength,
        )
    finally:
        if bar is not None:
            bar.close()
    out.save(a.out)
    height, width = out.image.shape[:2]
    return {
        "out": a.out,
        "height": height,
        "width": width,
        "steps": out.steps,
        "guidance": out.guidance,
        "scheduler": out.scheduler,
        "seed": out.seed,
        "prompt_truncated": out.prompt_truncated,
        "strength": out.strength,
    }


class _Bar:
    """A tqdm bar driven by the pipeline's progress(done, total) callback."""

    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress_bar(as_json: bool) -> _Bar | None:
    """A progress bar on an interactive terminal; none with --json or when stderr is not a TTY."""
    if as_json or not sys.stderr.isatty():
        return None
    try:
        import tqdm  # noqa: F401  (the export extra has it; the device runtime may not)
    except ImportError:
        return None
    return _Bar()
