"""The judge of generated one-object scenes reads rendered scenes exactly, and finds nothing in a
grey image."""

from __future__ import annotations

import numpy as np
import pytest

from mmedge.data.scenes import COLOURS, POSITIONS, SHAPES, SIZES, SceneObject, render
from mmedge.evaluation.drawn_scenes import attribute_accuracy, judge


@pytest.mark.parametrize("side", [32, 64])
def test_rendered_scenes_are_judged_exactly(side: int) -> None:
    rng = np.random.default_rng(side)
    names = list(COLOURS)
    wanted = [
        SceneObject(
            SHAPES[rng.integers(len(SHAPES))],
            names[rng.integers(len(names))],
            SIZES[rng.integers(len(SIZES))],
            POSITIONS[rng.integers(len(POSITIONS))],
        )
        for _ in range(150)
    ]
    images = [render([o], side, rng) for o in wanted]
    assert [judge(im).object for im in images] == wanted
    scores = attribute_accuracy(images, wanted)
    assert scores == {"shape": 1.0, "colour": 1.0, "size": 1.0, "position": 1.0, "colour_and_shape": 1.0}
    shifted = [
        SceneObject(o.shape, names[(names.index(o.colour) + 1) % len(names)], o.size, o.position)
        for o in wanted
    ]
    assert attribute_accuracy(images, shifted)["colour"] == 0.0


def test_a_grey_image_holds_no_object() -> None:
    grey = np.full((32, 32, 3), 128, np.uint8)
    assert judge(grey).object is None
    assert attribute_accuracy([grey], [SceneObject("circle", "red", "large", "center")])["shape"] == 0.0
