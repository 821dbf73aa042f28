"""Judge generated images of one-object synthetic scenes: which colour, shape, size and position
does the drawn object have? (torch-free, deterministic, no trained classifier)

The scenes' backgrounds are grey (saturation under 40 levels) and every object colour is saturated,
so the object is the set of saturated pixels. Its colour is the palette colour nearest their
median; its shape, size and position are those of the rendered template (every shape x size x
position, drawn by the scene renderer itself) that overlaps it best (IoU). On rendered scenes the
judge is exact (tests/evaluation/test_drawn_scenes.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmedge.data.scenes import (
    COLOURS,
    HELD_OUT_SEED,
    POSITIONS,
    SHAPES,
    SIZES,
    SceneObject,
    caption_for,
    draw_object,
)
from mmedge.errors import InvalidInputError

SATURATION = 60  # max - min channel level above which a pixel belongs to the object
MIN_PIXELS = 3  # fewer saturated pixels than this: no object drawn
ATTRIBUTES = ("shape", "colour", "size", "position")


@dataclass(frozen=True)
class Judgement:
    """The attributes read from one image (None: no object found)."""

    object: SceneObject | None
    iou: float  # overlap of the saturated pixels with the best template


@functools.cache
def _templates(side: int) -> tuple[tuple[tuple[str, str, str], ...], np.ndarray]:
    """(shape, size, position) keys and their masks, (templates, side * side) bool."""
    keys, masks = [], []
    for shape in SHAPES:
        for size in SIZES:
            for position in POSITIONS:
                canvas = np.zeros((side, side), np.uint8)
                draw_object(canvas, SceneObject(shape, "red", size, position), 255)
                keys.append((shape, size, position))
                masks.append(canvas.reshape(-1) > 127)
    return tuple(keys), np.stack(masks)


def judge(image: np.ndarray) -> Judgement:
    """The drawn object of a uint8 (S, S, 3) RGB image."""
    side = image.shape[0]
    pixels = image.reshape(-1, 3).astype(np.int16)
    found = (pixels.max(1) - pixels.min(1)) > SATURATION
    if found.sum() < MIN_PIXELS:
        return Judgement(None, 0.0)
    palette = np.array(list(COLOURS.values()), np.float32)
    median = np.median(pixels[found], axis=0)
    colour = list(COLOURS)[int(np.argmin(((palette - median) ** 2).sum(1)))]
    keys, masks = _templates(side)
    inter = (masks & found[None]).sum(1)
    union = (masks | found[None]).sum(1)
    iou = inter / union
    best = int(np.argmax(iou))
    shape, size, position = keys[best]
    return Judgement(SceneObject(shape, colour, size, position), float(iou[best]))


def attribute_accuracy(images: Sequence[np.ndarray], wanted: Sequence[SceneObject]) -> dict[str, float]:
    """Share of images whose judged attribute equals the wanted one, per attribute, and for colour
    and shape together."""
    judged = [judge(im).object for im in images]

    def share(test) -> float:  # type: ignore[no-untyped-def]
        return round(float(np.mean([o is not None and test(o, w) for o, w in zip(judged, wanted)])), 4)

    out = {a: share(lambda o, w, a=a: getattr(o, a) == getattr(w, a)) for a in ATTRIBUTES}
    out["colour_and_shape"] = share(lambda o, w: o.colour == w.colour and o.shape == w.shape)
    return out


def random_object(rng: np.random.Generator) -> SceneObject:
    """One object, uniformly over shapes, colours, sizes and positions."""
    return SceneObject(
        SHAPES[int(rng.integers(len(SHAPES)))],
        list(COLOURS)[int(rng.integers(len(COLOURS)))],
        SIZES[int(rng.integers(len(SIZES)))],
        POSITIONS[int(rng.integers(len(POSITIONS)))],
    )


def held_out_objects(n: int, seed: int = HELD_OUT_SEED) -> list[tuple[SceneObject, str]]:
    """n one-object scenes from the held-out stream, each with a freshly phrased caption."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(7,)))
    out = []
    for _ in range(n):
        o = random_object(rng)
        out.append((o, caption_for([o], rng)))
    return out


def evaluate_generation(
    pipeline: Any, n: int = 200, steps: int | None = None, guidance: float | None = None, seed: int = 0
) -> dict[str, Any]:
    """Draw n held-out one-object captions (seeds seed, seed + 1, ...) with an image-generation
    pipeline and judge the images: per-attribute accuracy (chance: shape 1/4, colour 1/6)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInputError(f"n must be a positive int, got {n!r}")
    steps = pipeline.config.steps if steps is None else steps
    guidance = pipeline.config.guidance if guidance is None else guidance
    wanted, images = [], []
    for i, (obj, caption) in enumerate(held_out_objects(n)):
        wanted.append(obj)
        images.append(pipeline.generate(caption, steps=steps, guidance=guidance, seed=seed + i).pixels)
    return {"images": n, "steps": steps, "guidance": guidance, **attribute_accuracy(images, wanted)}
