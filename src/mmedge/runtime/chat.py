"""Image chat and captioning (BLIP-2-style packages): vision -> qformer -> projector -> LLM.

- The image prefix (the LLM embeddings of an image) is cached per image, so several questions on
  one image run the vision tower once.
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
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.generation import GenerationConfig, KVCache, LanguageModel, TextStream, stream_text

IMAGE_CACHE_SIZE = 16
CONVERSATION_CACHE_SIZE = 8

History = Sequence[tuple[str, str]]


class _LRU:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

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


class ChatPipeline:
    """`caption(image, **gen)` and `chat(image, prompt, history=None, stream=False, **gen)`.

    Generation parameters are HF `generate` names (see `GenerationConfig`); the prompt template
    comes from the manifest (BLIP-2: "Question: {} Answer:").
    """

    def __init__(self, runner: ComponentRunner):
        self.runner = runner
        self.lm = LanguageModel(runner)
        g = runner.manifest.generation
        self.template = str(g.get("prompt_template", "{}"))
        self.caption_prompt = str(g.get("caption_prompt", ""))
        self.prefix_tokens = int(g["num_query_tokens"])  # LLM positions the image prefix takes
        self._images = _LRU(IMAGE_CACHE_SIZE)
        self._conversations = _LRU(CONVERSATION_CACHE_SIZE)

    # -- images ---------------------------------------------------------------------------
    def image_prefix(self, image: Any, channel_order: str = "RGB") -> tuple[str, np.ndarray]:
        """(key, LLM embeddings (Q, E)) of one image; cached by the preprocessed pixels' hash."""
        from mmedge.runtime.images import load_image, preprocess

        if self.runner.preprocess is None:
            raise InvalidInputError("this package has no image preprocessing; it is not an image chat model")
        pixels = preprocess(
            [load_image(image, channel_order=channel_order, limits=self.runner.image_limits)],
            self.runner.preprocess,
        )
        key = hashlib.sha256(pixels.tobytes()).hexdigest()
        cached = self._images.get(key)
        if cached is None:
            feats = self.runner.run_batched("vision", {"pixel_values": pixels})["image_embeds"]
            query = self.runner.run_batched("qformer", {"image_embeds": feats})["query_output"]
            cached = self.runner.run_batched("projector", {"query_output": query})["image_prefix"][0]
            self._images.put(key, cached)
        return key, cached

    # -- text -----------------------------------------------------------------------------
    def _turn(self, question: str) -> str:
        return self.template.replace("{}", question) if "{}" in self.template else question

    def _ids(self, text: str, first: bool) -> list[int]:
        """Token ids of a piece of the conversation; only the first piece gets the tokenizer's specials."""
        ids = self.lm.tokenizer.encode(text, add_special_tokens=first, allow_empty=first)
        if first and not ids:
            ids = [self.lm.bos_token_id]
        return ids

    # -- generation -----------------------------------------------------------------------
    def caption(self, image: Any, channel_order: str = "RGB", **gen: Any) -> str:
        """A caption of `image` (the manifest's caption prompt, often empty)."""
        config = GenerationConfig.from_kwargs(**gen)
        _, prefix = self.image_prefix(image, channel_order)
        ids = self._ids(self.caption_prompt, first=True)
        return "".join(self._generate(prefix, ids, self.lm.new_cache(), config, store=None))

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
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
        key, prefix = self.image_prefix(image, channel_order)
        state = self._conversations.get((key, history), pop=True)
        if state is not None:  # reuse the KV cache of the earlier turns; run only the new question
            cache, ids = state
            new = self._ids(" " + self._turn(prompt), first=False)
        else:
            cache, ids = self.lm.new_cache(), []
            text = " ".join(f"{self._turn(q)} {a}" for q, a in history)
            new = self._ids((text + " " if text else "") + self._turn(prompt), first=True)
        pieces = self._generate(
            prefix if state is None else None, new, cache, config, store=(key, history, prompt, ids)
        )
        return pieces if stream else "".join(pieces)

    def _generate(
        self,
        prefix: np.ndarray | None,
        new_ids: list[int],
        cache: KVCache,
        config: GenerationConfig,
        store: tuple | None,
    ) -> Iterator[str]:
        lm = self.lm
        embeds = lm.embed(np.array([new_ids]))[0]
        if prefix is not None:
            embeds = np.concatenate([prefix, embeds])
        answer: list[int] = []
        stream = TextStream(lm.tokenizer, config.stop_strings)
        history_ids = (store[3] if store else []) + new_ids
        yield from stream_text(lm, embeds, config, cache, history_ids, generated=answer, stream=stream)
        if store is None or stream.stopped:
            return  # a stop string cut the answer: the cache no longer matches the text; do not keep it
        key, history, prompt, ids = store
        # Generation stops right after choosing its last token, so that token is not in the cache yet.
        text_in_cache = cache.length - self.prefix_tokens
        if text_in_cache < len(ids) + len(new_ids) + len(answer):
            if cache.length + 1 > lm.max_context:
                return  # no room to continue this conversation anyway
            lm.forward(lm.embed(np.array([[answer[-1]]])), cache)
        self._conversations.put(
            (key, (*tuple(history), (prompt, stream.text))), (cache, ids + new_ids + answer)
        )


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
