"""Captioning and VQA with a decoder that cross-attends to the image (BLIP), torch-free.

The image takes no decoder positions: the decoder's cross-attention reads per-layer keys/values
that the package's `cross_kv` component computes from the image features (captioning) or from the
question encoder's states (VQA, `question_encoder`: the question read with cross-attention to the
image). They are computed once per image (or image and question), kept in an LRU, and bound to
every decoder step of a generation, beams included (docs/generation.md, "Cross-attention decoders").

- `caption(image, prompt=None)`: the decoder starts from the package's `prompt.caption` ([DEC]) or,
  with a prompt such as "a picture of", from `prompt.first_turn` ([DEC] and the prompt's tokens),
  as HF `BlipForConditionalGeneration.generate` does; the caption continues the prompt.
- `chat(image, prompt)`: a captioning package continues the prompt (`caption`); a VQA package
  encodes the question as its tokenizer does ([CLS] question [SEP], as HF's processor) and answers
  from [DEC]. There are no multi-turn conversations: each call stands alone.

Thread-safe: sessions are shared; each call owns its KV cache, and cached keys/values are only read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.chat import _LRU, IMAGE_CACHE_SIZE, History, _checked_history
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.generation import GenerationConfig, LanguageModel, TextStream, Usage, stream_text
from mmedge.runtime.prompts import PromptEncoder


class CrossAttentionChatPipeline:
    """`caption(image, prompt=None)` and `chat(image, prompt)` for cross-attention decoders."""

    def __init__(self, runner: ComponentRunner):
        self.runner = runner
        self.lm = LanguageModel(runner)
        m = runner.manifest
        if m.prompt is None or not m.has_role("cross_kv"):
            raise InvalidInputError(f"package {m.name!r} has no cross-attention decoder")
        self.prompts = PromptEncoder(m.prompt, self.lm.config, runner.tokenizer)
        self.stop_strings = m.prompt.stop_strings
        self.cross_component = m.by_role("cross_kv")
        self.cross_input = m.component(self.cross_component).inputs[0].name
        self.question_component = m.by_role("question_encoder") if m.has_role("question_encoder") else None
        self._features = _LRU(IMAGE_CACHE_SIZE)  # image key -> the image path's values
        self._cross = _LRU(IMAGE_CACHE_SIZE)  # (image key, question ids) -> cross keys/values

    def __repr__(self) -> str:
        m = self.runner.manifest
        return f"CrossAttentionChatPipeline({m.name!r}, family={m.family!r}, backend={self.runner.backend.name!r})"

    @property
    def answers_questions(self) -> bool:
        """Whether the package is a VQA model (the question goes to a question encoder)."""
        return self.question_component is not None

    # -- encoders ---------------------------------------------------------------------------
    def _image(self, image: Any, channel_order: str) -> tuple[str, dict[str, np.ndarray]]:
        """(key, the image path's values) of one image, cached by the hash of its pixels."""
        from mmedge.runtime.images import load_image, preprocess

        assert self.runner.preprocess is not None  # a chat manifest has one
        self.runner.preload(["image"])
        pixels = preprocess(
            [load_image(image, channel_order=channel_order, limits=self.runner.image_limits)],
            self.runner.preprocess,
        )
        key = hashlib.sha256(pixels.tobytes()).hexdigest()
        values = self._features.get(key)
        if values is None:
            values = self.runner.run_path_values("image", self.runner.image_sources(pixels))
            self._features.put(key, values)
        return key, values

    def cross_states(
        self, image: Any, question: str | None = None, channel_order: str = "RGB"
    ) -> dict[str, np.ndarray]:
        """The decoder's cross keys/values (`cross_key_values.*`, one row each) for an image, or
        for an image and a question (VQA); computed once and cached."""
        ids: tuple[int, ...] = ()
        if self.question_component is not None:
            if not isinstance(question, str) or not question.strip():
                raise InvalidInputError("a VQA package needs a non-empty question")
            # as HF's processor: [CLS] question [SEP]; longer than the encoder's context is an error
            ids = tuple(self.runner.tokenizer.encode(question))
        key, values = self._image(image, channel_order)
        cached = self._cross.get((key, ids))
        if cached is not None:
            return dict(cached)
        if self.question_component is not None:
            q = np.array([ids], np.int64)
            feeds = {
                s.name: values[s.name][:1]
                for s in self.runner.manifest.component(self.question_component).inputs
                if s.name in values
            }
            states = self.runner.run_batched(
                self.question_component, {**feeds, "input_ids": q, "attention_mask": np.ones_like(q)}
            )
            memory = next(iter(states.values()))
        else:
            memory = values[self.cross_input]
        out = self.runner.run_batched(self.cross_component, {self.cross_input: memory[:1]})
        cross = {name: np.ascontiguousarray(value, np.float32) for name, value in out.items()}
        self._cross.put((key, ids), cross)
        return dict(cross)

    # -- generation -------------------------------------------------------------------------
    def caption(
        self,
        image: Any,
        prompt: str | None = None,
        channel_order: str = "RGB",
        stream: bool = False,
        usage: Usage | None = None,
        **gen: Any,
    ) -> str | Iterator[str]:
        """A caption of `image`, continuing `prompt` when given (e.g. "a picture of"; the prompt is
        not repeated in the caption); with `stream=True` an iterator of text pieces."""
        config = GenerationConfig.from_kwargs(**gen)
        if self.question_component is not None:
            raise InvalidInputError("this is a VQA package: ask a question with chat(image, question)")
        if prompt is None:
            pieces = self.prompts.caption()
        else:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidInputError("prompt must be a non-empty string or None")
            pieces = self.prompts.conversation((), prompt)
        ids = [i for i in self.prompts.encode(pieces) if i is not None]
        out = self._generate(ids, self.cross_states(image, None, channel_order), config, usage)
        return out if stream else "".join(out)

    def chat(
        self,
        image: Any,
        prompt: str,
        history: History | None = None,
        stream: bool = False,
        channel_order: str = "RGB",
        usage: Usage | None = None,
        **gen: Any,
    ) -> str | Iterator[str]:
        """VQA packages: the answer to the question `prompt`; captioning packages: the caption
        continuing `prompt`. `history` must be empty: these models answer one turn."""
        if _checked_history(history):
            raise InvalidInputError("this package answers one question at a time: history must be empty")
        if self.question_component is None:
            return self.caption(image, prompt, channel_order, stream, usage, **gen)
        config = GenerationConfig.from_kwargs(**gen)
        cross = self.cross_states(image, prompt, channel_order)
        ids = [i for i in self.prompts.encode(self.prompts.caption()) if i is not None]
        out = self._generate(ids, cross, config, usage)
        return out if stream else "".join(out)

    def generate_ids(self, image: Any, prompt: str | None = None, **gen: Any) -> list[int]:
        """New token ids (the best beam's with `num_beams` > 1): for parity checks."""
        config = GenerationConfig.from_kwargs(**gen)
        generated: list[int] = []
        if self.question_component is None:
            pieces = self.prompts.caption() if prompt is None else self.prompts.conversation((), prompt)
            cross = self.cross_states(image)
        else:
            pieces, cross = self.prompts.caption(), self.cross_states(image, prompt)
        ids = [i for i in self.prompts.encode(pieces) if i is not None]
        for _ in self._generate(ids, cross, config, None, generated):
            pass
        return generated

    def _generate(
        self,
        ids: list[int],
        cross: dict[str, np.ndarray],
        config: GenerationConfig,
        usage: Usage | None,
        generated: list[int] | None = None,
    ) -> Iterator[str]:
        lm = self.lm
        cache = lm.new_cache()
        cache.cross = cross  # bound to every step of this generation, beams included
        usage = usage if usage is not None else Usage()
        usage.prompt_tokens = len(ids)
        text = TextStream(lm.tokenizer, config.stop_strings + self.stop_strings)
        embeds = lm.embed(np.array([ids]))[0]
        return stream_text(lm, embeds, config, cache, ids, generated=generated, stream=text, usage=usage)
