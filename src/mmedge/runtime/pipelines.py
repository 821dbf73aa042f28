"""The task pipeline of a package: which class serves each `task` of the manifest."""

from __future__ import annotations

from mmedge.errors import UnsupportedError
from mmedge.runtime.chat import ChatPipeline
from mmedge.runtime.classification import ClassificationPipeline
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.cross_chat import CrossAttentionChatPipeline
from mmedge.runtime.image_generation import ImageGenerationPipeline
from mmedge.runtime.retrieval import RetrievalPipeline
from mmedge.runtime.textgen import TextGenerationPipeline

AnyPipeline = (
    RetrievalPipeline
    | ChatPipeline
    | CrossAttentionChatPipeline
    | TextGenerationPipeline
    | ClassificationPipeline
    | ImageGenerationPipeline
)
PIPELINES: dict[str, type[AnyPipeline]] = {
    "retrieval": RetrievalPipeline,
    "chat": ChatPipeline,
    "generation": TextGenerationPipeline,
    "classification": ClassificationPipeline,
    "image_generation": ImageGenerationPipeline,
}


def open_pipeline(runner: ComponentRunner) -> AnyPipeline:
    """The pipeline for the runner's package task."""
    if runner.manifest.task == "chat" and runner.manifest.has_role("cross_kv"):
        return CrossAttentionChatPipeline(runner)  # the image enters by cross-attention (BLIP)
    cls = PIPELINES.get(runner.manifest.task)
    if cls is None:
        raise UnsupportedError(f"task {runner.manifest.task!r} has no pipeline in this version of mmedge")
    return cls(runner)
