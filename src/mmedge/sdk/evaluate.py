"""`mmedge eval`: task metrics of a pipeline on `--data` (torch-free)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError
from mmedge.runtime.metrics import retrieval_metrics
from mmedge.runtime.retrieval import RetrievalPipeline

CHUNK = 256


def _chunked(fn, items: list) -> np.ndarray:  # noqa: ANN001
    return np.concatenate([fn(items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)])


def evaluate(pipeline: RetrievalPipeline, data: str, limit: int | None = None) -> dict[str, Any]:
    """Text->image and image->text recall@1/@5 on `--data`; an identical scene counts as a hit."""
    from mmedge.data import load_data

    runner = pipeline.runner
    items = load_data(data, image_size=runner.preprocess.image_size, limit=limit)
    return {"package": runner.manifest.name, "data": data, **evaluate_items(pipeline, items)}


def evaluate_items(pipeline: RetrievalPipeline, items: list) -> dict[str, Any]:  # noqa: ANN001 - DataItem
    """Retrieval metrics on loaded data items (image, text, key)."""
    runner = pipeline.runner
    if any(it.text is None for it in items):
        raise InvalidInputError("retrieval eval needs a caption per image; the data has images without text")
    img = _chunked(pipeline.embed_images, [it.image for it in items])
    txt = _chunked(pipeline.embed_texts, [it.text for it in items])
    metrics = retrieval_metrics(img, txt, [it.key for it in items])
    precisions = {c: runner.precision_of(c) for c in runner.manifest.components}
    return {"task": "retrieval", "precisions": precisions, **metrics}
