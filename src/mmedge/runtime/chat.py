"""Image chat and captioning: the image path's embeddings placed where the prompt template puts them.

- The image's LLM embeddings come from the manifest's `image` path (BLIP-2: vision -> Q-Former ->
  projector) and are cached per image, so several questions on one image run the encoders once.
  Where the path also reads an instruction (InstructBLIP), it is the conversation's first question
  (a caption's: its prompt text), and the cache is keyed by pixels and instruction together.
- The prompt template (`sections.PromptConfig`) says where the image goes, anywhere in the prompt.
- Multi-turn chat keeps each conversation's KV cache: when the next call's `history` is the
  previous history plus the answer this pipeline returned, only the new question is run through
  the LLM. Any other history is rebuilt from scratch (same answer, more compute).
- User text is tokenised as plain text: special tokens and placeholders typed by a user are not
  special. The image enters as embeddings, never as a token a user could type.

Thread-safe: sessions are shared; a conversation's cache is taken out of the store while in use.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.generation import GenerationConfig, KVCache, LanguageModel, TextStream, stream_text
from mmedge.runtime.prompts import Item, PromptEncoder
from mmedge.runtime.sections import template_text

IMAGE_CACHE_SIZE = 16
CONVERSATION_CACHE_SIZE = 8

History = Sequence[tuple[str, str]]


class _LRU:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict[Any, Any](), threading.Lock()

    def get(self, key: Any, pop: bool = False) -> Any:
        with self.lock:
            if key not in self.items:
                return None
            self.items.move_to_end(key)
            return self.items.pop(key) if pop else self.items[key]

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


@dataclass
class _Conversation:
    """A kept KV cache and the token ids it holds (image slots as None), for the repetition penalty."""

    cache: KVCache
    items: list[Item]


class ChatPipeline:
    """`caption(image, **gen)` and `chat(image, prompt, history=None, stream=False, **gen)`.

    Generation parameters are HF `generate` names (see `GenerationConfig`); the prompt template
    comes from the manifest (BLIP-2: "Question: {prompt} Answer:" after the image).
    """

    def __init__(self, runner: ComponentRunner):
        self.runner = runner
        self.lm = LanguageModel(runner)
        m = runner.manifest
        if m.prompt is None or m.pipeline.image_tokens is None:
            raise InvalidInputError(f"package {m.name!r} is not an image chat package")
        self.prompts = PromptEncoder(m.prompt, self.lm.config, runner.tokenizer)
        self.image_tokens = m.pipeline.image_tokens.count  # LLM positions one image takes
        self._images = _LRU(IMAGE_CACHE_SIZE)
        self._conversations = _LRU(CONVERSATION_CACHE_SIZE)

    def __repr__(self) -> str:
        m = self.runner.manifest
        return f"ChatPipeline({m.name!r}, family={m.family!r}, backend={self.runner.backend.name!r})"

    # -- images ---------------------------------------------------------------------------
    def image_prefix(
        self, image: Any, channel_order: str = "RGB", instruction: str | None = None
    ) -> tuple[str, np.ndarray]:
        """(key, LLM embeddings (T, E)) of one image; cached by the hash of the preprocessed pixels
        and of the instruction tokens when the image path reads an instruction."""
        from mmedge.runtime.images import load_image, preprocess

        if self.runner.preprocess is None:  # a chat manifest always has one; this guards hand-made runners
            raise InvalidInputError("this package has no image preprocessing; it is not an image chat model")
        image_array = load_image(image, channel_order=channel_order, limits=self.runner.image_limits)
        pixels = preprocess([image_array], self.runner.preprocess)
        sources = self.runner.image_sources(pixels, instruction)
        digest = hashlib.sha256()
        for name in sorted(sources):
            digest.update(name.encode() + b"\0" + sources[name].tobytes())
        key = digest.hexdigest()
        cached = self._images.get(key)
        if cached is None:
            cached = self.runner.run_path("image", sources)[0]
            if cached.shape[0] != self.image_tokens:
                raise InvalidInputError(
                    f"the image path yields {cached.shape[0]} embeddings; the package declares {self.image_tokens}"
                )
            self._images.put(key, cached)
        return key, cached

    # -- generation -----------------------------------------------------------------------
    def caption(
        self, image: Any, channel_order: str = "RGB", stream: bool = False, **gen: Any
    ) -> str | Iterator[str]:
        """A caption of `image` (the manifest's captioning prompt, often just the image); with
        `stream=True` an iterator of text pieces, as `chat`."""
        config = GenerationConfig.from_kwargs(**gen)
        items = self.prompts.encode(self.prompts.caption())
        _, prefix = self.image_prefix(image, channel_order, template_text(self.prompts.prompt.caption or ""))
        pieces = self._generate(items, prefix, self.lm.new_cache(), config, store=None)
        return pieces if stream else "".join(pieces)

    def chat(
        self,
        image: Any,
        prompt: str,
        history: History | None = None,
        stream: bool = False,
        channel_order: str = "RGB",
        **gen: Any,
    ) -> str | Iterator[str]:
        """Answer `prompt` about `image` after the earlier (question, answer) turns in `history`."""
        config = GenerationConfig.from_kwargs(**gen)
        history = _checked_history(history)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError("prompt must be a non-empty string")
        # The image's embeddings stay those of the first turn, so a kept KV cache stays valid.
        key, prefix = self.image_prefix(image, channel_order, history[0][0] if history else prompt)
        state: _Conversation | None = self._conversations.get((key, history), pop=True)
        if state is not None:  # reuse the KV cache of the earlier turns; run only the new question
            cache, before = state.cache, state.items
            new = self.prompts.encode(self.prompts.next_turn(prompt))
        else:
            cache, before = self.lm.new_cache(), []
            new = self.prompts.encode(self.prompts.conversation(history, prompt))
        pieces = self._generate(new, prefix, cache, config, store=(key, history, prompt, before))
        return pieces if stream else "".join(pieces)

    def _embed(self, items: list[Item], prefix: np.ndarray) -> np.ndarray:
        """(S, E) input embeddings: token embeddings with the image's embeddings at each image slot."""
        parts: list[np.ndarray] = []
        ids: list[int] = []
        for item in items:
            if item is None:
                if ids:
                    parts.append(self.lm.embed(np.array([ids]))[0])
                    ids = []
                parts.append(prefix)
            else:
                ids.append(item)
        if ids:
            parts.append(self.lm.embed(np.array([ids]))[0])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _generate(
        self,
        new: list[Item],
        prefix: np.ndarray,
        cache: KVCache,
        config: GenerationConfig,
        store: tuple[Any, ...] | None,
    ) -> Iterator[str]:
        lm = self.lm
        embeds = self._embed(new, prefix)
        answer: list[int] = []
        stream = TextStream(lm.tokenizer, config.stop_strings + self.prompts.prompt.stop_strings)
        before = store[3] if store else []
        seen = [i for i in before + new if i is not None]
        yield from stream_text(lm, embeds, config, cache, seen, generated=answer, stream=stream)
        if store is None or stream.stopped:
            return  # a stop string cut the answer: the cache no longer matches the text; do not keep it
        key, history, prompt, _ = store
        # Generation stops right after choosing its last token, so that token is not in the cache yet.
        positions = (
            len(before) + len(new) + (self.image_tokens - 1) * (before + new).count(None) + len(answer)
        )
        if cache.length < positions:
            if cache.length + 1 > lm.max_context:
                return  # no room to continue this conversation anyway
            lm.forward(lm.embed(np.array([[answer[-1]]])), cache)
        items = before + new + answer
        self._conversations.put((key, (*tuple(history), (prompt, stream.text))), _Conversation(cache, items))


def _checked_history(history: History | None) -> tuple[tuple[str, str], ...]:
    if history is None:
        return ()
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise InvalidInputError("history must be a list of (question, answer) pairs")
    out = []
    for i, turn in enumerate(history):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise InvalidInputError(f"history[{i}] must be a (question, answer) pair of strings")
        out.append((turn[0], turn[1]))
    return tuple(out)
