"""llava-tiny's training rows are the chat template's own tokens: what the chat pipeline feeds."""

from __future__ import annotations

import numpy as np
import pytest

from mmedge.data import caption_for, questions_for, sample_objects
from mmedge.models.llava.modeling import Llava, LlavaConfig
from mmedge.models.registry import load_preset
from mmedge.recipes.llava import VOCAB, _Conversations, _tokenizer
from mmedge.recipes.stages import IGNORE


@pytest.fixture(scope="module")
def convs() -> tuple[_Conversations, LlavaConfig]:
    family, raw = load_preset("llava-tiny")
    cfg: LlavaConfig = family.config_from_dict({**raw, "text": {**raw["text"], "vocab_size": VOCAB + 1}})
    rng = np.random.default_rng(0)
    scenes = [sample_objects(rng) for _ in range(300)]
    texts = [caption_for(o, rng) for o in scenes] + [cfg.caption_prompt]
    texts += [f"{qa.question} {qa.answer}" for o in scenes for qa in questions_for(o)]
    turns = [[(qa.question, qa.answer) for qa in questions_for(o)] for o in scenes[:50]]

    def section_of(tokenizer_json: str):
        return family.sections(cfg, Llava(cfg), tokenizer_json).chat_template

    tokenizer_json = _tokenizer(texts, cfg.image_token, section_of, turns)
    return _Conversations(section_of(tokenizer_json), tokenizer_json, cfg.text.bos_token_id), cfg


def _messages(turns, answered: bool) -> list[dict]:
    out: list[dict] = []
    for k, (q, a) in enumerate(turns):
        image = [{"type": "image"}] if k == 0 else []
        out.append({"role": "user", "content": [*image, {"type": "text", "text": q}]})
        if answered or k < len(turns) - 1:
            out.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return out


def _expanded(items, image: list[int]) -> list[int]:
    return [t for i in items for t in (image if i is None else [i])]


def test_first_turn_is_the_pipelines_prompt(convs) -> None:
    c, cfg = convs
    image = [c.chat.image_id] * cfg.image_tokens
    q = "where is the red circle?"
    ids, labels = c.row([(q, "top left")], image)
    prompt = _expanded(c.chat.encode(_messages([(q, "")], answered=False), 1), image)
    assert ids[: len(prompt)] == prompt and prompt[0] == cfg.text.bos_token_id
    assert prompt.count(c.chat.image_id) == 16
    assert set(labels[: len(prompt)]) == {IGNORE}
    target = ids[len(prompt) :]
    assert labels[len(prompt) :] == target and target[-1] == cfg.text.eos_token_id
    assert c.chat.tokenizer.decode(target[:-1]).strip() == "top left"


def test_conversation_row_is_the_template_rendering(convs) -> None:
    c, cfg = convs
    image = [c.chat.image_id] * cfg.image_tokens
    turns = [
        ("how many shapes are there?", "two"),
        ("what colour is the star?", "purple"),
        ("what shape is in the center?", "circle"),
    ]
    ids, labels = c.row(turns, image)
    assert ids == _expanded(
        c.chat.encode(_messages(turns, answered=True), 1, add_generation_prompt=False), image
    )
    answers = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert answers.count(cfg.text.eos_token_id) == len(turns)
    # every answer follows its question's generation prompt, as in a chat with history
    for k in range(1, len(turns) + 1):
        asked = _expanded(c.chat.encode(_messages(turns[:k], answered=False), 1), image)
        assert ids[: len(asked)] == asked and labels[len(asked) - 1] == IGNORE != labels[len(asked)]


def test_scene_text_fills_the_image_place(convs) -> None:
    c, _ = convs
    scene = c.plain("a small red circle in the center")
    ids, _ = c.row([("how many shapes are there?", "one")], scene)
    assert c.chat.image_id not in ids
    start = next(i for i in range(len(ids)) if ids[i : i + len(scene)] == scene)
    assert start > 1  # after BOS and the role


def test_mmedge_train_needs_a_clip_tower(tmp_path) -> None:
    from mmedge.errors import ConfigError
    from mmedge.recipes.base import TrainRequest, recipe_for, train_model

    family, recipe = recipe_for("llava-tiny")
    assert family.name == "llava" and recipe.__name__ == "mmedge.recipes.llava"
    with pytest.raises(ConfigError, match="--init CLIP_CHECKPOINT"):
        train_model(tmp_path / "out", TrainRequest(preset="llava-tiny"))


def test_patch_pairs_mark_the_four_patches_of_each_object() -> None:
    """An object sits where four patches meet; a centre object shares one patch with each corner one."""
    from mmedge.data.scenes import SceneObject
    from mmedge.recipes.llava import PAIRS, _patch_pairs

    objs = (SceneObject("circle", "red", "small", "top left"), SceneObject("star", "blue", "large", "center"))
    pairs = _patch_pairs(objs, 64, 16).reshape(4, 4, len(PAIRS))
    circle, star = PAIRS.index(("circle", "red")), PAIRS.index(("star", "blue"))
    assert np.argwhere(pairs[..., circle]).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert np.argwhere(pairs[..., star]).tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert pairs.sum() == 8
