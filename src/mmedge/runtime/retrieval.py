"""Retrieval pipeline (dual encoders such as CLIP): embeddings, vector search, zero-shot labels.

Images and texts are embedded by walking the manifest's `image` and `text` paths; zero-shot
probabilities use the package's learned temperature (`retrieval.logit_scale`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmedge.errors import IntegrityError, InvalidInputError
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.images import load_image, preprocess
from mmedge.runtime.indexes import Hit, Index, check_k, open_index
from mmedge.runtime.manifest import Manifest

# Upper bound on images / texts per call so one request cannot exhaust memory.
MAX_BATCH_ITEMS = 4096


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _as_list(items: object, what: str) -> list:
    if isinstance(items, (str, bytes, bytearray, memoryview)) or not isinstance(items, Sequence):
        if isinstance(items, np.ndarray) and items.ndim == 4:
            items = list(items)
        else:
            items = [items]
    items = list(items)
    if not items:
        raise InvalidInputError(f"no {what} given")
    if len(items) > MAX_BATCH_ITEMS:
        raise InvalidInputError(f"{len(items)} {what} in one call; the limit is {MAX_BATCH_ITEMS}")
    return items


def _label_list(labels: object) -> list | None:
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
        raise InvalidInputError(
            f"labels must be a sequence with one label per item, got {type(labels).__name__}"
        )
    return list(labels)


@dataclass(frozen=True)
class Label:
    label: str
    score: float  # probability over the given labels


def fp32_sha256(m: Manifest, component: str) -> str:
    """The sha256 of a component's fp32 graph: in the package, or recorded by `mmedge pack` in a
    bundle that does not carry it (a bundle's vectors then match its package's index)."""
    fp32 = m.component(component).precisions.get("fp32")
    if fp32 is not None:
        return m.files[fp32.file].sha256
    recorded = m.bundle.fp32_sha256.get(component) if m.bundle is not None else None
    if recorded is None:
        raise IntegrityError(f"package {m.name!r} names no fp32 graph of its {component!r} component")
    return recorded


class RetrievalPipeline:
    """Embed images and texts into one space; search an embedded index; classify zero-shot."""

    def __init__(self, runner: ComponentRunner):
        self.runner = runner
        m = runner.manifest
        if m.retrieval is None or m.preprocess is None:
            raise InvalidInputError(f"package {m.name!r} is not a retrieval package (task {m.task})")
        component, output = runner.path_output("image")
        spec = next(s for s in m.component(component).outputs if s.name == output)
        self.dim = int(spec.shape[-1])
        # Who made the vectors: the package name and the hash of the image path's last graph (fp32).
        self.model_id = f"{m.name}:{fp32_sha256(m, component)[:16]}"
        self.preprocess = m.preprocess
        self.templates: list[str] = list(m.retrieval.label_templates)
        self.logit_scale = m.retrieval.logit_scale
        self._index: Index | None = None
        self._index_lock = threading.Lock()

    def __repr__(self) -> str:
        m = self.runner.manifest
        return f"RetrievalPipeline({m.name!r}, family={m.family!r}, dim={self.dim}, backend={self.runner.backend.name!r})"

    # --- embeddings -------------------------------------------------------------------

    def embed_images(self, images: object, channel_order: str = "RGB") -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of images (paths, bytes, arrays or PIL images)."""
        items = _as_list(images, "images")
        # A first call loads the image path before decoding: the load's transient copy of the
        # weights is gone before decoders and image buffers take their memory (a lower peak).
        self.runner.preload(["image"])
        size = self.preprocess.image_size
        pixels = np.empty((len(items), 3, size, size), np.float32)  # (N, 3, S, S)
        for i, x in enumerate(items):  # one decoded image at a time: only the small tensors add up
            pixels[i] = preprocess([self._load(i, x, channel_order)], self.preprocess)[0]
        return l2_normalize(self.runner.run_path("image", {"pixel_values": pixels}).astype(np.float32))

    def _load(self, i: int, image: object, channel_order: str) -> np.ndarray:
        """One image of a batch; an error names which (its path, or its index)."""
        try:
            return load_image(image, channel_order=channel_order, limits=self.runner.image_limits)
        except InvalidInputError as exc:
            which = repr(str(image)) if isinstance(image, (str, os.PathLike)) else f"#{i}"
            raise InvalidInputError(f"image {which}: {exc}") from exc

    def embed_texts(self, texts: object) -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of texts (truncated to the context length)."""
        items = _as_list(texts, "texts")
        ids, mask = self.runner.tokenizer.encode_batch(items)
        return l2_normalize(
            self.runner.run_path("text", {"input_ids": ids, "attention_mask": mask}).astype(np.float32)
        )

    # --- index --------------------------------------------------------------------------

    @property
    def index(self) -> Index:
        """The index that add_* and search use: an in-memory usearch index unless one was set or opened."""
        with self._index_lock:
            if self._index is None:
                from mmedge.runtime.index import VectorIndex

                self._index = VectorIndex(self.dim, model=self.model_id)
            return self._index

    @index.setter
    def index(self, value: Index) -> None:
        if value.dim != self.dim:
            raise InvalidInputError(f"index has dimension {value.dim}; this model embeds to {self.dim}")
        if value.model is not None and value.model != self.model_id:
            raise InvalidInputError(
                f"the index holds vectors of model {value.model}; this package embeds with {self.model_id}: "
                "rebuild the index with this package"
            )
        with self._index_lock:
            self._index = value

    def open_index(self, location: str | os.PathLike[str], create: bool = True) -> Index:
        """Use the index at `location` (a usearch directory or a Milvus URI, docs/indexes.md), made
        for this model's vectors when it does not exist yet and `create`; returns it."""
        self.index = idx = open_index(location, self.dim, model=self.model_id, create=create)
        return idx

    def add_images(
        self,
        images: object,
        ids: Sequence[int] | None = None,
        labels: Sequence[str] | None = None,
        channel_order: str = "RGB",
    ) -> list[int]:
        """Embed images and add them to the index; ids default to the next free integers."""
        emb = self.embed_images(images, channel_order=channel_order)
        idx = self.index
        if ids is None:
            start = len(idx)
            while start in idx:
                start += 1
            ids = list(range(start, start + len(emb)))
        idx.add(ids, emb, labels=_label_list(labels))
        return [int(i) for i in ids]

    def add_texts(self, texts: object, ids: Sequence[int], labels: Sequence[str] | None = None) -> list[int]:
        """Embed texts and add them to the index under the given ids."""
        self.index.add(ids, self.embed_texts(texts), labels=_label_list(labels))
        return [int(i) for i in ids]

    def search(
        self, query: object, k: int = 5, channel_order: str = "RGB", image: bool | None = None
    ) -> list[Hit]:
        """Top-k index entries for one query. A str is a text query (also one that names a file) unless
        `image=True`; a path object, bytes, an array or a PIL image is an image."""
        check_k(k)
        if len(self.index) == 0:
            raise InvalidInputError("the index is empty: add images (add_images) or load an index first")
        as_image = not isinstance(query, str) if image is None else image
        vec = self.embed_images([query], channel_order) if as_image else self.embed_texts([query])
        return self.index.search(vec, k)[0]

    # --- zero-shot classification -------------------------------------------------------

    def classify(
        self,
        image: object,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        channel_order: str = "RGB",
    ) -> list[Label]:
        """Zero-shot labels for one image, best first; each label embedded with every template, averaged."""
        if isinstance(labels, str):
            raise InvalidInputError(
                f"labels must be a list of strings, got the single string {labels!r} (split it yourself if it lists several)"
            )
        labels = _as_list(labels, "labels")
        if not all(isinstance(lab, str) and lab.strip() for lab in labels):
            raise InvalidInputError("labels must be non-empty strings")
        templates = list(templates or self.templates)
        if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise InvalidInputError("each template must be a string containing '{}'")
        prompts = [t.replace("{}", lab) for lab in labels for t in templates]
        text = self.embed_texts(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
        text = l2_normalize(text)
        img = self.embed_images([image], channel_order)[0]
        logits = self.logit_scale * (text @ img)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        return [Label(labels[i], float(probs[i])) for i in order]
