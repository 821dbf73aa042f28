"""Prompt templates -> the LLM's input: token ids with image slots (torch-free).

A template (`sections.PromptConfig`) is split at its markers first; user text goes only into the
text between them and is tokenised as plain text (`encode_special_tokens`), so neither a typed
"{image}" nor a typed "<s>" becomes an image slot or a special token. Adjacent text is joined before
tokenising, so a conversation tokenises as one string, as HF processors do.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmedge.errors import InvalidInputError
from mmedge.runtime.sections import ANSWER, BOS, EOS, IMAGE, PROMPT, LLMConfig, PromptConfig, split_template
from mmedge.runtime.texts import TextTokenizer

# One item of an encoded prompt: a token id, or None for one image's embeddings.
Item = int | None


class PromptEncoder:
    """Renders a package's prompt templates for a conversation and tokenises them."""

    def __init__(self, prompt: PromptConfig, llm: LLMConfig, tokenizer: TextTokenizer):
        self.prompt, self.llm, self.tokenizer = prompt, llm, tokenizer

    def _pieces(
        self, template: str, prompt: str | None = None, answer: str | None = None
    ) -> list[str | Item]:
        out: list[str | Item] = []
        for piece in split_template(template):
            if piece == IMAGE:
                out.append(None)
            elif piece == BOS:
                out.append(self.llm.bos_token_id)
            elif piece == EOS:
                out.append(self.llm.eos_token_id)
            elif piece == PROMPT:
                out.append(_text(prompt, "prompt"))
            elif piece == ANSWER:
                out.append(_text(answer, "answer"))
            else:
                out.append(piece)
        return out

    def conversation(self, history: Sequence[tuple[str, str]], prompt: str) -> list[str | Item]:
        """The whole conversation so far, ending with the new user turn."""
        p = self.prompt
        pieces: list[str | Item] = []
        for i, (question, answer) in enumerate(history):
            pieces += self._pieces(p.first_turn if i == 0 else p.turn, prompt=question)
            pieces += self._pieces(p.answer, answer=answer)
        pieces += self._pieces(p.turn if history else p.first_turn, prompt=prompt)
        return pieces

    def next_turn(self, prompt: str) -> list[str | Item]:
        """A later user turn, to append after an answer that is already in the KV cache."""
        return self._pieces(self.prompt.turn, prompt=prompt)

    def caption(self) -> list[str | Item]:
        if self.prompt.caption is None:
            raise InvalidInputError("this package declares no captioning prompt")
        return self._pieces(self.prompt.caption)

    def encode(self, pieces: Sequence[str | Item]) -> list[Item]:
        """Token ids (None = an image slot) of rendered pieces; adjacent text tokenised as one string."""
        out: list[Item] = []
        text: list[str] = []

        def flush() -> None:
            if text:
                out.extend(self.tokenizer.encode("".join(text), add_special_tokens=False, allow_empty=True))
                text.clear()

        for piece in pieces:
            if isinstance(piece, str):
                text.append(piece)
            else:
                flush()
                out.append(piece)
        flush()
        return out


def _text(value: str | None, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    return value
