"""Image chat and captioning: image embeddings placed where the prompt puts them, in any number.

- An image's LLM embeddings come from the manifest's `image` path (BLIP-2: vision -> Q-Former ->
  projector; LLaVA: vision -> projector) and are cached per image, so several questions on one image
  run the encoders once. How many LLM positions an image takes is the manifest's
  `pipeline.image_tokens` rule: a fixed count, or LLaVA-NeXT's tiles ("anyres"). Where the path
  also reads an instruction (InstructBLIP), it is the conversation's first user text (a caption's:
  its prompt text), and the cache is keyed by pixels and instruction together.
- The conversation becomes token ids with image slots either through the package's Jinja chat
  template (`runtime.chat_template`: images anywhere, several per conversation) or through its
  marker template (`sections.PromptConfig`: one image, BLIP-2 style).
- KV caches are kept per conversation and reused by longest common prefix: a request whose tokens
  and images start like a kept conversation (typically: the same conversation plus the answer and
  a new question) runs only what follows the shared prefix. Any other request starts afresh.
- User text is tokenised as plain text: special tokens and placeholders typed by a user are not
  special. An image enters as embeddings, never as a token a user could type.

Thread-safe: sessions are shared; a conversation's cache is taken out of the store while in use.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.chat_template import MAX_IMAGES, TemplateChat, checked_messages, content_parts
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.generation import (
    GenerationConfig,
    KVCache,
    LanguageModel,
    TextStream,
    Usage,
    stream_text,
)
from mmedge.runtime.prompts import Item, PromptEncoder
from mmedge.runtime.sections import template_text

IMAGE_CACHE_SIZE = 16
CONVERSATION_CACHE_SIZE = 8

History = Sequence[tuple[str, str]]
Messages = Sequence[Mapping[str, Any]]


class _LRU:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict[Any, Any](), threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            if key not in self.items:
                return None
            self.items.move_to_end(key)
            return self.items[key]

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


@dataclass
class _Conversation:
    """A kept KV cache and what its slots hold: token ids, and (image key, i) for image positions."""

    cache: KVCache
    positions: list[Hashable]


class _Conversations:
    """Kept conversations; `take` removes the one sharing the longest prefix with a request."""

    def __init__(self, size: int):
        self.size, self.kept, self.lock = size, list[_Conversation](), threading.Lock()

    def take(self, positions: Sequence[Hashable]) -> tuple[_Conversation | None, int]:
        with self.lock:
            best, shared = None, 0
            for conv in self.kept:
                n = _common_prefix(conv.positions, positions)
                if n > shared:
                    best, shared = conv, n
            if best is not None:
                self.kept.remove(best)
            return best, shared

    def put(self, conv: _Conversation) -> None:
        with self.lock:
            self.kept.append(conv)
            del self.kept[: max(0, len(self.kept) - self.size)]


def _common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class _Image:
    key: str  # hash of the preprocessed pixels
    embeds: np.ndarray  # (T, E) LLM input embeddings


class ChatPipeline:
    """`chat(image, prompt, history)`, `chat_messages(messages)` and `caption(image)`.

    Generation parameters are HF `generate` names (see `GenerationConfig`); the prompt format comes
    from the manifest (a chat template, or BLIP-2's "Question: {prompt} Answer:" after the image).
    """

    def __init__(self, runner: ComponentRunner):
        self.runner = runner
        self.lm = LanguageModel(runner)
        m = runner.manifest
        if (m.prompt is None and m.chat_template is None) or m.pipeline.image_tokens is None:
            raise InvalidInputError(f"package {m.name!r} is not an image chat package")
        self.template = TemplateChat(m.chat_template, runner.tokenizer) if m.chat_template else None
        self.prompts = PromptEncoder(m.prompt, self.lm.config, runner.tokenizer) if m.prompt else None
        self.image_tokens = m.pipeline.image_tokens
        stops = m.chat_template.stop_strings if m.chat_template else m.prompt.stop_strings  # type: ignore[union-attr]
        self.stop_strings: tuple[str, ...] = stops
        self._images = _LRU(IMAGE_CACHE_SIZE)
        self._newline_embed: np.ndarray | None = None
        self._conversations = _Conversations(CONVERSATION_CACHE_SIZE)

    def __repr__(self) -> str:
        m = self.runner.manifest
        return f"ChatPipeline({m.name!r}, family={m.family!r}, backend={self.runner.backend.name!r})"

    # -- images ---------------------------------------------------------------------------
    def image_prefix(
        self, image: Any, channel_order: str = "RGB", instruction: str | None = None
    ) -> tuple[str, np.ndarray]:
        """(key, LLM embeddings (T, E)) of one image; cached by the hash of the preprocessed pixels
        and of the instruction tokens when the image path reads an instruction."""
        found = self._image(image, channel_order, instruction)
        return found.key, found.embeds

    def _image(self, image: Any, channel_order: str, instruction: str | None = None) -> _Image:
        from mmedge.runtime.images import load_image, preprocess

        if self.runner.preprocess is None:  # a chat manifest always has one; this guards hand-made runners
            raise InvalidInputError("this package has no image preprocessing; it is not an image chat model")
        self.runner.preload(["image"])  # before decoding: a lower peak on a first call (retrieval.py)
        image_array = load_image(image, channel_order=channel_order, limits=self.runner.image_limits)
        rule = self.image_tokens
        if rule.anyres is not None:
            from mmedge.runtime.anyres import preprocess_anyres

            pixels = preprocess_anyres(image_array, rule.anyres)  # base view, then the tiles
            size = np.array(image_array.shape[:2], np.int64)  # the packing depends on the original size
        else:
            pixels, size = preprocess([image_array], self.runner.preprocess), np.zeros(0, np.int64)
        sources = self.runner.image_sources(pixels, instruction)
        digest = hashlib.sha256(size.tobytes())
        for name in sorted(sources):
            digest.update(name.encode() + b"\0" + sources[name].tobytes())
        key = digest.hexdigest()
        cached = self._images.get(key)
        if cached is None:
            views = self.runner.run_path("image", sources)  # (views, count, E)
            if views.shape[1] != rule.count:
                raise InvalidInputError(
                    f"the image path yields {views.shape[1]} embeddings per view; the package declares {rule.count}"
                )
            if rule.anyres is not None:
                from mmedge.runtime.anyres import pack_features

                embeds = pack_features(
                    views, (int(size[0]), int(size[1])), rule.anyres, self._newline(views.shape[2])
                )
            else:
                embeds = views[0]
            cached = _Image(key, embeds)
            self._images.put(key, cached)
        return cached

    def _newline(self, width: int) -> np.ndarray:
        """LLaVA-NeXT's learned row separator, read once from the package (verified as it is read)."""
        if self._newline_embed is None:
            import io

            from mmedge.errors import IntegrityError

            rel = self.image_tokens.newline
            assert rel is not None  # set exactly with the anyres rule (sections.ImageTokens)
            try:
                value = np.load(io.BytesIO(self.runner.package.read_verified(rel)), allow_pickle=False)
            except ValueError as exc:
                raise IntegrityError(f"{rel} is not a float32 .npy array: {exc}") from None
            if value.dtype != np.float32 or value.shape != (width,) or not np.isfinite(value).all():
                raise IntegrityError(
                    f"{rel} must hold {width} finite float32 values, got {value.dtype} {value.shape}"
                )
            self._newline_embed = value
        return self._newline_embed

    # -- conversations --------------------------------------------------------------------
    def caption(
        self, image: Any, channel_order: str = "RGB", stream: bool = False, **gen: Any
    ) -> str | Iterator[str]:
        """A caption of `image` (the manifest's captioning prompt, often just the image); with
        `stream=True` an iterator of text pieces, as `chat`."""
        config = GenerationConfig.from_kwargs(**gen)
        if self.template is not None:
            prompt = self.template.section.caption_prompt
            if prompt is None:
                raise InvalidInputError("this package declares no captioning prompt")
            return self.chat(image, prompt, stream=stream, channel_order=channel_order, **gen)
        assert self.prompts is not None
        img = self._image(image, channel_order, template_text(self.prompts.prompt.caption or ""))
        pieces = self._generate(self.prompts.encode(self.prompts.caption()), [img], config)
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
        GenerationConfig.from_kwargs(**gen)  # bad parameters fail before any image work
        turns = _checked_history(history)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError("prompt must be a non-empty string")
        messages: list[dict[str, Any]] = []
        for i, (question, answer) in enumerate((*turns, (prompt, None))):
            parts: list[dict[str, Any]] = [{"type": "image", "image": image}] if i == 0 else []
            messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.chat_messages(messages, stream=stream, channel_order=channel_order, **gen)

    def chat_messages(
        self,
        messages: Messages,
        stream: bool = False,
        channel_order: str = "RGB",
        usage: Usage | None = None,
        **gen: Any,
    ) -> str | Iterator[str]:
        """The assistant's reply to a conversation: messages `{"role": "system"|"user"|"assistant",
        "content": str | [{"type": "text", "text": ...}, {"type": "image", "image": <path, bytes,
        array or PIL image>}, ...]}`, images anywhere (a package with a marker template takes one
        image, in the first user message). Earlier turns are replayed from the kept KV cache.
        `usage`, when given, is filled with the token counts and the finish reason as it runs."""
        config = GenerationConfig.from_kwargs(**gen)
        messages = checked_messages(messages)
        sources = [
            part.get("image")
            for i, m in enumerate(messages)
            for part in content_parts(m, i)
            if part["type"] == "image"
        ]
        if len(sources) > MAX_IMAGES:
            raise InvalidInputError(f"{len(sources)} images in one conversation; the limit is {MAX_IMAGES}")
        if self.template is not None:
            items = self.template.encode(messages, len(sources))
        else:
            items = self._marker_items(messages, len(sources))
        # An image path that reads an instruction gets the conversation's first user text, so the
        # image's embeddings (and a kept KV cache) stay those of the first turn.
        first = next((content_parts(m, i) for i, m in enumerate(messages) if m["role"] == "user"), [])
        instruction = " ".join(p["text"] for p in first if p["type"] == "text")
        images = [self._image(src, channel_order, instruction) for src in sources]
        pieces = self._generate(items, images, config, usage)
        return pieces if stream else "".join(pieces)

    def _marker_items(self, messages: Messages, images: int) -> list[Item]:
        """A marker-template package's items: one image, user/assistant turns, a user turn last."""
        assert self.prompts is not None
        texts: list[tuple[str, str]] = []
        for i, m in enumerate(messages):
            parts = content_parts(m, i)
            if m["role"] == "system":
                raise InvalidInputError("this package's prompt format has no system message")
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want:
                raise InvalidInputError(
                    f"messages[{i}] must be a {want} message (turns alternate, user first)"
                )
            if any(p["type"] == "image" for p in parts) and i != 0:
                raise InvalidInputError("this package takes its image in the first user message")
            texts.append((m["role"], " ".join(p["text"] for p in parts if p["type"] == "text")))
        if images != 1:
            raise InvalidInputError(f"this package takes exactly one image per conversation, got {images}")
        if texts[-1][0] != "user":
            raise InvalidInputError("the last message must be the user's")
        history = [(texts[i][1], texts[i + 1][1]) for i in range(0, len(texts) - 1, 2)]
        return self.prompts.encode(self.prompts.conversation(history, texts[-1][1]))

    def _embed(self, items: Sequence[Item], images: Sequence[_Image], start: int) -> np.ndarray:
        """(S, E) input embeddings of the positions from `start` on: token embeddings, and each
        image's embeddings at its slot."""
        parts: list[np.ndarray] = []
        ids: list[int] = []
        position, image = 0, 0
        for item in items:
            if item is None:
                embeds = images[image].embeds
                image += 1
                if position + len(embeds) > start:
                    if ids:
                        parts.append(self.lm.embed(np.array([ids]))[0])
                        ids = []
                    parts.append(embeds[max(0, start - position) :])
                position += len(embeds)
            else:
                if position >= start:
                    ids.append(item)
                position += 1
        if ids:
            parts.append(self.lm.embed(np.array([ids]))[0])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _generate(
        self,
        items: list[Item],
        images: Sequence[_Image],
        config: GenerationConfig,
        usage: Usage | None = None,
    ) -> Iterator[str]:
        lm = self.lm
        positions: list[Hashable] = []
        image = 0
        for item in items:
            if item is None:
                img = images[image]
                positions.extend((img.key, j) for j in range(len(img.embeds)))
                image += 1
            else:
                positions.append(item)
        if len(positions) + 1 > lm.max_context:
            tokens = sum(len(i.embeds) for i in images)
            raise InvalidInputError(
                f"the conversation takes {len(positions)} positions ({len(images)} image(s): {tokens}, text: "
                f"{len(positions) - tokens}), leaving no room to answer within the model's context of "
                f"{lm.max_context} tokens"
            )
        kept, shared = self._conversations.take(positions)
        shared = min(shared, len(positions) - 1)  # at least one new position: its logits start the answer
        if kept is not None:
            cache = kept.cache
            cache.truncate(shared)
        else:
            cache = lm.new_cache()
        usage = usage if usage is not None else Usage()
        usage.prompt_tokens, usage.cached_tokens = len(positions), cache.length
        return self._stream(items, images, positions, cache, config, usage)

    def _stream(
        self,
        items: list[Item],
        images: Sequence[_Image],
        positions: list[Hashable],
        cache: KVCache,
        config: GenerationConfig,
        usage: Usage,
    ) -> Iterator[str]:
        lm = self.lm
        embeds = self._embed(items, images, cache.length)
        answer: list[int] = []
        stream = TextStream(lm.tokenizer, config.stop_strings + self.stop_strings)
        seen = [p for p in positions if isinstance(p, int)]
        yield from stream_text(lm, embeds, config, cache, seen, generated=answer, stream=stream, usage=usage)
        # Generation stops right after choosing its last token, so that token is not in the cache:
        # the kept slots are the prompt and the answer tokens that were fed back.
        held = (positions + answer)[: cache.length]
        self._conversations.put(_Conversation(cache, held))


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
