"""evaluate_chat asks the question kinds it is given, scores multi-word answers, refuses unknown kinds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mmedge.data import HELD_OUT_SEED, generate_scenes
from mmedge.errors import InvalidInputError
from mmedge.evaluation.tasks import VQA_KINDS, evaluate_chat


class _Oracle:
    """Answers from the held-out scenes' own QA pairs (position answers with a trailing full stop),
    except that it gets every `wrong` kind wrong."""

    def __init__(self, n: int, wrong: str = "") -> None:
        self.answers = {
            (s.image.tobytes(), qa.question): (qa.answer, qa.kind)
            for s in generate_scenes(n, HELD_OUT_SEED)
            for qa in s.qa
        }
        self.wrong = wrong
        self.asked: list[str] = []
        self.runner = SimpleNamespace(manifest=SimpleNamespace(components={}), precision_of=lambda c: "fp32")

    def chat(self, image, question: str, max_new_tokens: int) -> str:
        answer, kind = self.answers[(image.tobytes(), question)]
        self.asked.append(kind)
        return "nothing" if kind == self.wrong else f" {answer.title()}."

    def caption(self, image, max_new_tokens: int) -> str:
        return ""


def test_default_kinds_leave_position_questions_out() -> None:
    pipe = _Oracle(10)
    r = evaluate_chat(pipe, "shapes:10", questions=1000, captions=0)
    assert set(pipe.asked) == set(VQA_KINDS) and r["vqa_accuracy"] == 1.0
    assert set(r["vqa_by_kind"]) == set(VQA_KINDS)


def test_position_kind_is_asked_and_scored_when_named() -> None:
    pipe = _Oracle(10, wrong="position")
    r = evaluate_chat(pipe, "shapes:10", questions=1000, captions=0, kinds=(*VQA_KINDS, "position"))
    assert "position" in pipe.asked and r["vqa_by_kind"]["position"] == 0.0
    assert all(r["vqa_by_kind"][k] == 1.0 for k in VQA_KINDS)
    positions = pipe.asked.count("position")
    assert r["vqa_accuracy"] == pytest.approx(1 - positions / r["questions"], abs=1e-4)


def test_multi_word_answers_score() -> None:
    r = evaluate_chat(_Oracle(10), "shapes:10", questions=1000, captions=0, kinds=("position",))
    assert r["questions"] > 0 and r["vqa_accuracy"] == 1.0  # "Top Left." reads as "top left"


@pytest.mark.parametrize("kinds", [(), ("size",), "position"])
def test_unknown_kinds_are_refused(kinds) -> None:
    with pytest.raises(InvalidInputError, match="question kinds"):
        evaluate_chat(_Oracle(1), "shapes:1", kinds=kinds)
