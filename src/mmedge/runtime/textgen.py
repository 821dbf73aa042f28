"""Text generation pipeline for decoder-only LM packages: prompt in, text (or a stream of pieces) out."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.generation import GenerationConfig, LanguageModel, TextStream, Usage, stream_text
from mmedge.runtime.prompts import PromptEncoder


class TextGenerationPipeline:
    """`generate(prompt, **gen)`; parameters as in HF `generate` (see `GenerationConfig`).

    Thread-safe: sessions are shared, and each call owns its KV cache and step buffers.
    """

    def __init__(self, runner: ComponentRunner):
        self.runner = runner
        self.lm = LanguageModel(runner)
        if runner.manifest.prompt is None:
            raise InvalidInputError(f"package {runner.manifest.name!r} declares no prompt")
        self.prompts = PromptEncoder(runner.manifest.prompt, self.lm.config, runner.tokenizer)

    def __repr__(self) -> str:
        m = self.runner.manifest
        return (
            f"TextGenerationPipeline({m.name!r}, family={m.family!r}, backend={self.runner.backend.name!r})"
        )

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt token ids: the template filled with user text, which cannot inject special tokens."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError("prompt must be a non-empty string")
        return [i for i in self.prompts.encode(self.prompts.conversation((), prompt)) if i is not None]

    def generate(
        self, prompt: str, stream: bool = False, usage: Usage | None = None, **gen: Any
    ) -> str | Iterator[str]:
        """Continue `prompt`; the text, or with `stream=True` an iterator of text pieces. `usage`,
        when given, is filled with the token counts and the finish reason as it runs."""
        config = GenerationConfig.from_kwargs(**gen)
        ids = self.encode_prompt(prompt)
        text = TextStream(self.lm.tokenizer, config.stop_strings + self.prompts.prompt.stop_strings)
        usage = usage if usage is not None else Usage()
        usage.prompt_tokens = len(ids)
        embeds = self.lm.embed(np.array([ids]))[0]
        pieces = stream_text(self.lm, embeds, config, history=ids, stream=text, usage=usage)
        return pieces if stream else "".join(pieces)

    def generate_ids(self, ids: list[int], **gen: Any) -> list[int]:
        """New token ids after prompt ids (no template): for parity checks and token-level use;
        with `num_beams` > 1 the best beam's."""
        config = GenerationConfig.from_kwargs(**gen)
        embeds = self.lm.embed(np.array([ids]))[0]
        if config.beams:
            from mmedge.runtime.beam_search import beam_search

            return beam_search(self.lm, embeds, config, history=ids).tokens
        return list(self.lm.generate_ids(embeds, config, history=ids))
