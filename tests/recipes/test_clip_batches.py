"""clip-tiny's synthetic batches: every image keeps its full caption, short texts are extra rows,
and the truth matrix the loss masks with says exactly which texts describe which images."""

from __future__ import annotations

import itertools

import numpy as np

from mmedge.data.scenes import SHAPES, parse_caption, scene_key
from mmedge.recipes.clip import _synthetic_batches
from mmedge.runtime.sections import PreprocessConfig


class _Words:
    """A stand-in tokenizer that keeps the texts, so the test can read them back."""

    def encode_batch(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        self.texts = texts
        return np.zeros((len(texts), 4), np.int64), np.ones((len(texts), 4), np.int64)


def test_short_texts_are_extra_rows_with_their_truth() -> None:
    words = _Words()
    pre = PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    batch, hard = 24, 6
    pixels, ids, _, owners, true_of = next(_synthetic_batches(words, pre, batch, hard, seed=0, short=0.5))
    texts = words.texts
    assert pixels.shape[0] == batch and ids.shape[0] == len(texts) == true_of.shape[0] > batch
    assert owners[:batch].tolist() == list(range(batch))  # each image's target is its full caption
    assert all(hard <= int(o) < batch - hard for o in owners[batch:])  # short texts: rows without a twin
    assert bool(true_of[np.arange(len(texts)), owners].all())  # each text describes its own image
    keys = [scene_key(parse_caption(t)) for t in texts[:batch]]
    for t, i in itertools.product(range(batch), range(batch)):  # a full caption: only identical scenes
        assert bool(true_of[t, i]) == (keys[t] == keys[i])
    objects = [parse_caption(t) for t in texts[:batch]]
    for t in range(batch, len(texts)):  # every image a short text is marked true of has its shapes
        named = {w for w in texts[t].replace(".", "").split() if w in SHAPES}
        assert named
        for i in range(batch):
            has = named <= {o.shape for o in objects[i]}
            assert has or not bool(true_of[t, i])
