"""`sdk.Pipeline(...)`: open a package by name or path and return the pipeline for its task."""

from __future__ import annotations

import os

from mmedge.errors import UnsupportedError
from mmedge.runtime.backends.base import SessionOptions
from mmedge.runtime.chat import ChatPipeline
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.retrieval import RetrievalPipeline
from mmedge.runtime.store import resolve
from mmedge.runtime.textgen import TextGenerationPipeline


def Pipeline(  # noqa: N802 - a factory that reads as the class users expect
    name_or_path: str | os.PathLike,
    backend: str = "ort",
    precision: str = "auto",
    threads: int = 0,
    device: str = "cpu",
) -> RetrievalPipeline | TextGenerationPipeline | ChatPipeline:
    """Verify a package and return its task pipeline: retrieval (CLIP), generation (causal LMs) or image chat (BLIP-2).

    `precision="auto"` takes the best build each component has (int8, then fp16, then fp32).
    """
    runner = ComponentRunner(
        resolve(name_or_path),
        backend=backend,
        precision=precision,
        options=SessionOptions(threads=threads, device=device),
    )
    task = runner.manifest.task
    if task == "retrieval":
        return RetrievalPipeline(runner)
    if task == "generation":
        return TextGenerationPipeline(runner)
    if task == "chat":
        return ChatPipeline(runner)
    raise UnsupportedError(f"task {task!r} has no pipeline in this version of mmedge")
