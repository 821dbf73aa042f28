"""Synthetic scenes: determinism, captions, QA and rendered pixels agree with the objects."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mmedge.data.scenes import (
    COLOURS,
    HELD_OUT_SEED,
    POSITIONS,
    SHAPES,
    SIZES,
    TRAIN_SEED,
    VOCABULARY,
    SceneObject,
    caption_for,
    generate_scenes,
    iter_scenes,
    make_scene,
    parse_caption,
    position_pixel,
    questions_for,
    render,
)
from mmedge.errors import InvalidInputError

SCENES = generate_scenes(400, TRAIN_SEED)


def test_constants() -> None:
    assert SHAPES == ("circle", "square", "triangle", "star")
    assert list(COLOURS) == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert SIZES == ("small", "large")
    assert len(POSITIONS) == 5 and TRAIN_SEED != HELD_OUT_SEED


def test_generation_is_deterministic() -> None:
    again = generate_scenes(400, TRAIN_SEED)
    for a, b in zip(SCENES, again):
        assert a.key == b.key and a.caption == b.caption and a.qa == b.qa
        np.testing.assert_array_equal(a.image, b.image)


def test_subsets_are_stable() -> None:
    short = generate_scenes(7, TRAIN_SEED)
    streamed = [s for s, _ in zip(iter_scenes(TRAIN_SEED), range(7))]
    for i, (a, b) in enumerate(zip(short, streamed)):
        for other in (SCENES[i], b, make_scene(TRAIN_SEED, i)):
            assert other.key == a.key and other.caption == a.caption
            np.testing.assert_array_equal(other.image, a.image)
    later = next(iter_scenes(TRAIN_SEED, start=123))
    assert later.caption == SCENES[123].caption


def test_seeds_and_sizes() -> None:
    held_out = generate_scenes(50, HELD_OUT_SEED)
    assert [s.key for s in held_out] != [s.key for s in SCENES[:50]]
    big = generate_scenes(20, TRAIN_SEED, image_size=96)
    for small, large in zip(SCENES, big):
        assert small.image.shape == (64, 64, 3) and small.image.dtype == np.uint8
        assert large.image.shape == (96, 96, 3)
        assert large.key == small.key and large.caption == small.caption  # size only changes pixels


def test_objects_cover_the_vocabulary() -> None:
    objects = [o for s in SCENES for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == set(SIZES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {len(s.objects) for s in SCENES} == {1, 2, 3}
    for s in SCENES:
        order = [POSITIONS.index(o.position) for o in s.objects]
        assert order == sorted(set(order))  # distinct positions, canonical order


def test_captions_name_every_attribute() -> None:
    words = set(VOCABULARY)
    for s in SCENES:
        assert s.caption == s.caption.lower()
        for o in s.objects:
            assert all(w in s.caption for w in (o.size, o.colour, o.shape))
        assert parse_caption(s.caption) == s.objects
        assert set(re.findall(r"[a-z]+", s.caption)) <= words
        for qa in s.qa:
            assert set(re.findall(r"[a-z]+", qa.question + " " + qa.answer)) <= words


def test_key_equal_iff_caption_meaning_equal() -> None:
    by_key = {}
    for s in SCENES:
        by_key.setdefault(s.key, s)
    distinct = list(by_key.values())[:60]
    for a in distinct:
        for b in distinct:
            assert (parse_caption(a.caption) == parse_caption(b.caption)) == (a.key == b.key)
    # Duplicated keys really are the same meaning even when the phrasing differs.
    same = make_scene(TRAIN_SEED, 0)
    assert same.key == SCENES[0].key


def test_fresh_phrasings_keep_the_meaning() -> None:
    rng = np.random.default_rng(7)
    scene = next(s for s in SCENES if len(s.objects) == 3)
    captions = {caption_for(scene.objects, rng) for _ in range(50)}
    assert len(captions) > 5
    assert all(parse_caption(c) == scene.objects for c in captions)
    # Order given does not matter: captions list objects in canonical position order.
    shuffled = caption_for(tuple(reversed(scene.objects)), np.random.default_rng(1))
    assert parse_caption(shuffled) == scene.objects


def test_qa_answers_match_objects() -> None:
    count_words = {1: "one", 2: "two", 3: "three"}
    for s in SCENES:
        kinds = [q.kind for q in s.qa]
        assert kinds.count("count") == 1 and kinds.count("shape") == len(s.objects)
        assert set(kinds) <= {"colour", "shape", "count", "position"}
        for qa in s.qa:
            if qa.kind == "count":
                assert qa.answer == count_words[len(s.objects)]
            elif qa.kind == "shape":
                (o,) = [o for o in s.objects if f" {o.position}?" in qa.question]
                assert qa.answer == o.shape
            elif qa.kind == "colour":
                matches = [o for o in s.objects if qa.question == f"what colour is the {o.shape}?"]
                assert len(matches) == 1 and qa.answer == matches[0].colour
            else:
                matches = [o for o in s.objects if qa.question == f"where is the {o.colour} {o.shape}?"]
                assert len(matches) == 1 and qa.answer == matches[0].position


def test_colour_question_only_for_unique_shape() -> None:
    objs = (SceneObject("star", "red", "small", "top left"), SceneObject("star", "blue", "large", "center"))
    qa = questions_for(objs)
    assert not [q for q in qa if q.kind == "colour"]
    assert {q.answer for q in qa if q.kind == "position"} == {"top left", "center"}


def test_pixels_show_object_colours() -> None:
    for s in SCENES:
        for o in s.objects:
            x, y = position_pixel(o.position, 64)
            assert tuple(s.image[y, x]) == COLOURS[o.colour], (s.caption, o)
        corner = s.image[0, 0].astype(int)
        assert corner.max() - corner.min() < 40  # grey-ish background, never an object colour


def test_every_shape_and_size_is_drawn_distinctly() -> None:
    areas = {}
    for shape in SHAPES:
        for size in SIZES:
            img = render((SceneObject(shape, "red", size, "center"),), 64)
            areas[shape, size] = int(np.all(img == COLOURS["red"], axis=-1).sum())
    for shape in SHAPES:
        assert areas[shape, "large"] > 2 * areas[shape, "small"] > 0
    assert len({areas[s, "large"] for s in SHAPES}) == len(SHAPES)


def test_bad_inputs_raise() -> None:
    with pytest.raises(InvalidInputError, match="colour"):
        SceneObject("circle", "pink", "small", "center")
    with pytest.raises(InvalidInputError, match="distinct positions"):
        render((SceneObject("circle", "red", "small", "center"),) * 2)
    with pytest.raises(InvalidInputError, match="1 to 3"):
        caption_for((), np.random.default_rng(0))
    with pytest.raises(InvalidInputError, match="image_size"):
        generate_scenes(1, 0, image_size=8)
    with pytest.raises(InvalidInputError, match="n must"):
        generate_scenes(-1, 0)
    with pytest.raises(InvalidInputError, match="seed"):
        make_scene(-5, 0)


def test_ten_thousand_scenes_generate() -> None:
    # Speed is a benchmark's business (a busy machine took 23 s here); this checks the count and that
    # scenes stay distinct at scale.
    scenes = generate_scenes(10_000, HELD_OUT_SEED)
    assert len(scenes) == 10_000
    assert len({s.caption for s in scenes}) > 5_000


def test_scene_slots_give_each_fact_a_fixed_place() -> None:
    from mmedge.data import scene_slots
    from mmedge.data.scenes import EMPTY_SLOT, SLOT_WORDS

    for s in SCENES:
        words = scene_slots(s.objects).split()
        assert len(words) == SLOT_WORDS == 20
        assert words[0] == ("one", "two", "three")[len(s.objects) - 1]
        at = {o.position: o for o in s.objects}
        for i, p in enumerate(POSITIONS):
            o = at.get(p)
            assert words[1 + 3 * i : 4 + 3 * i] == ([o.size, o.colour, o.shape] if o else [EMPTY_SLOT] * 3)
        for shape, word in zip(SHAPES, words[16:]):
            having = [o for o in s.objects if o.shape == shape]
            assert word == (having[0].colour if len(having) == 1 else EMPTY_SLOT)
        assert set(words) <= set(VOCABULARY)


def test_short_texts_are_true_of_their_scene_and_judged_exactly() -> None:
    from mmedge.data.scenes import (
        Mention,
        SceneObject,
        mention_text,
        mentions_hold,
        partial_mentions,
        sample_objects,
    )

    rng = np.random.default_rng(0)
    for _ in range(300):
        objects = sample_objects(rng)
        mentions = partial_mentions(objects, rng)
        assert 1 <= len(mentions) <= min(2, len(objects))
        assert mentions_hold(mentions, objects)
        text = mention_text(mentions, rng)
        assert all(m.shape in text and (m.colour is None or m.colour in text) for m in mentions)
    red_circle = SceneObject("circle", "red", "small", "center")
    blue_circle = SceneObject("circle", "blue", "large", "top left")
    assert mentions_hold([Mention("circle", "red")], [blue_circle, red_circle])
    assert not mentions_hold([Mention("circle", "green")], [blue_circle, red_circle])
    # two mentions need two distinct objects: one red circle does not make "a circle and a red circle"
    assert not mentions_hold([Mention("circle"), Mention("circle", "red")], [red_circle])
    assert mentions_hold([Mention("circle"), Mention("circle", "red")], [blue_circle, red_circle])
    assert not mentions_hold([Mention("circle", position="center")], [blue_circle])


def test_swap_attribute_binds_the_same_words_to_other_objects() -> None:
    from collections import Counter

    from mmedge.data.scenes import SWAP_KINDS, SceneObject, sample_objects, scene_key, swap_attribute

    rng = np.random.default_rng(0)
    swapped = 0
    for _ in range(300):
        objects = sample_objects(rng)
        out = swap_attribute(objects, rng)
        assert scene_key(out) != scene_key(objects)
        tradeable = any(getattr(a, k) != getattr(b, k) for a in objects for b in objects for k in SWAP_KINDS)
        if not tradeable:  # nothing to trade: perturb's one-attribute edit
            continue
        assert [o.position for o in out] == [o.position for o in objects]
        changed = [(a, b) for a, b in zip(objects, out) if a != b]
        kinds = {k for a, b in changed for k in SWAP_KINDS if getattr(a, k) != getattr(b, k)}
        assert len(changed) == 2 and len(kinds) == 1  # a trade: one attribute, the same values overall
        (kind,) = kinds
        assert Counter(getattr(o, kind) for o in out) == Counter(getattr(o, kind) for o in objects)
        swapped += 1
    assert swapped > 100
    lone = (SceneObject("circle", "red", "small", "center"),)
    assert len(swap_attribute(lone, rng)) == 1 and swap_attribute(lone, rng) != lone
