"""Text generation pipeline for `causal-lm` packages: prompt in, text (or a stream of pieces) out."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.generation import GenerationConfig, LanguageModel, stream_text


class TextGenerationPipeline:
    """`generate(prompt, **gen)`; parameters as in HF `generate` (see `GenerationConfig`).

    Thread-safe: sessions are shared, and each call owns its KV cache and step buffers.
    """

    def __init__(self, runner: ComponentRunner):
        self.runner = runner
        self.lm = LanguageModel(runner)
        self.template = str(runner.manifest.generation.get("prompt_template", "{}"))

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt token ids: the template filled with user text, which cannot inject special tokens."""
        return self.lm.tokenizer.encode(
            self.template.replace("{}", prompt) if "{}" in self.template else prompt
        )

    def generate(self, prompt: str, stream: bool = False, **gen: Any) -> str | Iterator[str]:
        """Continue `prompt`; the text, or with `stream=True` an iterator of text pieces."""
        config = GenerationConfig.from_kwargs(**gen)
        ids = self.encode_prompt(prompt)
        pieces = stream_text(self.lm, self.lm.embed(np.array([ids]))[0], config, history=ids)
        return pieces if stream else "".join(pieces)

    def generate_ids(self, ids: list[int], **gen: Any) -> list[int]:
        """New token ids after prompt ids (no template): for parity checks and token-level use."""
        config = GenerationConfig.from_kwargs(**gen)
        return list(self.lm.generate_ids(self.lm.embed(np.array([ids]))[0], config, history=ids))
