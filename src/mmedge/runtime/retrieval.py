"""Retrieval pipeline (dual encoders such as CLIP): embeddings, vector search, zero-shot labels,
and for packages with an ITM component (BLIP) two-stage search that re-ranks with it.

Images and texts are embedded by walking the manifest's `image` and `text` paths; zero-shot
probabilities use the package's learned temperature (`retrieval.logit_scale`). Re-ranking
(docs/retrieval.md) takes the contrastive top K from the index and re-scores those pairs with the
ITM component, which reads the image path's features (e.g. BLIP's ViT tokens) beside the text.
The index keeps only the contrastive vectors, so a text query's candidate images are encoded again
from their source (by default the hit's label, an image path), and an image query's candidate
texts are the hits' labels: features kept beside the index would cost tokens x width floats per
image (BLIP ViT-B/16 at 384 px: 577 x 768 x 4 bytes = 1.7 MiB, against 1 KiB for its vector).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from mmedge.errors import IntegrityError, InvalidInputError
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.images import load_image, preprocess
from mmedge.runtime.indexes import Hit, Index, check_k, open_index
from mmedge.runtime.manifest import Manifest
from mmedge.runtime.modality_inputs import MODALITY_PATHS, mean_rows, prepare_items

# Upper bound on images / texts per call so one request cannot exhaust memory.
MAX_BATCH_ITEMS = 4096
# Candidates the ITM component re-scores per search by default (where the package has one).
DEFAULT_RERANK = 16


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


def _video_clips(data: object) -> list:
    """Clips from one (T, H, W, 3) array, a (N, T, H, W, 3) array or a list of clips (each an array
    or a list of frames)."""
    if isinstance(data, np.ndarray) and data.ndim in (4, 5):
        return _as_list([data] if data.ndim == 4 else list(data), "video clips")
    if isinstance(data, np.ndarray) or not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise InvalidInputError(
            "video: give a clip as a (T, H, W, 3) uint8 array, or several as (N, T, H, W, 3) or a list"
        )
    return _as_list(data, "video clips")


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
        self.itm: str | None = m.by_role("itm") if m.has_role("itm") else None

    def __repr__(self) -> str:
        m = self.runner.manifest
        return f"RetrievalPipeline({m.name!r}, family={m.family!r}, dim={self.dim}, backend={self.runner.backend.name!r})"

    # --- embeddings -------------------------------------------------------------------

    def embed_images(self, images: object, channel_order: str = "RGB") -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of images (paths, bytes, arrays or PIL images)."""
        items = _as_list(images, "images")
        values = self._image_values(items, channel_order)
        return l2_normalize(values[self._image_output].astype(np.float32))

    @property
    def _image_output(self) -> str:
        return self.runner.manifest.pipeline.paths["image"].output

    def _image_values(self, items: list, channel_order: str) -> dict[str, np.ndarray]:
        """Every value of the image path for these images (its embedding, and e.g. ITM features)."""
        # A first call loads the image path before decoding: the load's transient copy of the
        # weights is gone before decoders and image buffers take their memory (a lower peak).
        self.runner.preload(["image"])
        size = self.preprocess.image_size
        pixels = np.empty((len(items), 3, size, size), np.float32)  # (N, 3, S, S)
        for i, x in enumerate(items):  # one decoded image at a time: only the small tensors add up
            pixels[i] = preprocess([self._load(i, x, channel_order)], self.preprocess)[0]
        return self.runner.run_path_values("image", {"pixel_values": pixels})

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

    @property
    def modalities(self) -> tuple[str, ...]:
        """What this package embeds: "image", "text", then its further modalities (ImageBind's
        audio, depth, thermal, IMU), each on its own path."""
        paths = self.runner.manifest.pipeline.paths
        return ("image", "text", *(m for m in MODALITY_PATHS if m in paths))

    def embed(
        self,
        data: object,
        modality: str = "image",
        *,
        sample_rate: int | None = None,
        channel_order: str = "RGB",
    ) -> np.ndarray:
        """(N, D) float32 L2-normalised embeddings of items of one modality, all in one space.

        image: paths, bytes, arrays or PIL images; text: strings; audio: files, bytes, or arrays
        with their `sample_rate` (a recording's clips are embedded and averaged, as ImageBind
        does); depth: disparity maps; thermal: frames; imu: (6, T) traces (docs/modalities.md)."""
        if modality == "image":
            return self.embed_images(data, channel_order=channel_order)
        if modality == "text":
            return self.embed_texts(data)
        m = self.runner.manifest
        if modality not in self.modalities or m.modalities is None:
            raise InvalidInputError(
                f"package {m.name!r} does not embed {modality!r}; it embeds {', '.join(self.modalities)}"
            )
        items = _video_clips(data) if modality == "video" else _as_list(data, f"{modality} items")
        sources, counts = prepare_items(m.modalities, modality, items, sample_rate, image=m.preprocess)
        out = self.runner.run_path(modality, sources).astype(np.float32)
        # each item's rows (an audio recording's clips) averaged, as ImageBind averages clip embeddings
        return l2_normalize(mean_rows(out, counts))

    def add(
        self,
        data: object,
        modality: str = "image",
        ids: Sequence[int] | None = None,
        labels: Sequence[str] | None = None,
        *,
        sample_rate: int | None = None,
    ) -> list[int]:
        """Embed items of any modality the package has and add them to the one index; ids default
        to the next free integers. An index may hold images, texts, audio and depth side by side."""
        return self._add_vectors(self.embed(data, modality, sample_rate=sample_rate), ids, labels)

    def _add_vectors(self, emb: np.ndarray, ids: Sequence[int] | None, labels: object) -> list[int]:
        idx = self.index
        if ids is None:
            start = len(idx)
            while start in idx:
                start += 1
            ids = list(range(start, start + len(emb)))
        idx.add(ids, emb, labels=_label_list(labels))
        return [int(i) for i in ids]

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
        return self._add_vectors(self.embed_images(images, channel_order=channel_order), ids, labels)

    def add_texts(self, texts: object, ids: Sequence[int], labels: Sequence[str] | None = None) -> list[int]:
        """Embed texts and add them to the index under the given ids."""
        self.index.add(ids, self.embed_texts(texts), labels=_label_list(labels))
        return [int(i) for i in ids]

    def search(
        self,
        query: object,
        k: int = 5,
        channel_order: str = "RGB",
        image: bool | None = None,
        rerank: int | None = None,
        source: Callable[[Hit], object] | None = None,
        modality: str | None = None,
        sample_rate: int | None = None,
    ) -> list[Hit]:
        """Top-k index entries for one query. A str is a text query (also one that names a file) unless
        `image=True`; a path object, bytes, an array or a PIL image is an image. `modality` names
        the query's modality outright (`modalities`: e.g. "audio" for a recording, with
        `sample_rate` for an array); the index may hold entries of any modality.

        `rerank=K` re-scores the contrastive top K with the package's ITM component and returns the
        k best by match probability (`Hit.itm`; `Hit.score` stays the cosine). Default: K = 16 (at
        least k, at most the index size) where the package has an ITM component, else off; 0 turns
        it off. A text query's candidates are images, an image query's texts: `source(hit)` gives
        each (default: the hit's label, an image path or the text itself)."""
        check_k(k)
        n = len(self.index)
        if n == 0:
            raise InvalidInputError("the index is empty: add images (add_images) or load an index first")
        if modality is not None and modality not in ("image", "text"):
            if image or rerank:
                raise InvalidInputError(
                    f"a {modality} query is neither an image nor re-ranked (ITM scores image-text pairs)"
                )
            return self.index.search(self.embed([query], modality, sample_rate=sample_rate), k)[0]
        if modality is not None:
            if image is not None and image != (modality == "image"):
                raise InvalidInputError(f"image={image} contradicts modality={modality!r}")
            image = modality == "image"
        if sample_rate is not None:
            raise InvalidInputError("sample_rate is for audio queries (modality='audio')")
        depth = self._rerank_depth(rerank, k, n)
        as_image = not isinstance(query, str) if image is None else image
        if as_image:
            values = self._image_values([query], channel_order)
            vec = l2_normalize(values[self._image_output].astype(np.float32))
        else:
            vec = self.embed_texts([query])
        hits = self.index.search(vec, max(k, depth))[0]
        if not depth:
            return hits[:k]
        candidates = hits[:depth]
        if as_image:
            texts = [self._candidate(h, source, "text") for h in candidates]
            probs = self._score(
                lambda a, b: {k_: np.repeat(v, b - a, axis=0) for k_, v in values.items()}, texts
            )
        else:
            images = [self._candidate(h, source, "image") for h in candidates]
            probs = self._score(lambda a, b: self._image_values(images[a:b], channel_order), [query] * depth)
        order = np.argsort(-probs, kind="stable")[:k]
        return [replace(candidates[i], itm=float(probs[i])) for i in order]

    def _rerank_depth(self, rerank: object, k: int, n: int) -> int:
        """How many candidates to re-score (0: none), checked against the package and the index."""
        if rerank is None:
            return min(max(DEFAULT_RERANK, k), n) if self.itm is not None else 0
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 0:
            raise InvalidInputError(f"rerank must be a positive int (0: no re-ranking), got {rerank!r}")
        if rerank == 0:
            return 0
        if self.itm is None:
            raise InvalidInputError(
                f"package {self.runner.manifest.name!r} has no ITM component to re-rank with; use rerank=0"
            )
        if rerank > n:
            raise InvalidInputError(f"rerank={rerank} is larger than the index ({n} entries)")
        if rerank < min(k, n):
            raise InvalidInputError(f"rerank={rerank} re-scores fewer candidates than the k={k} asked for")
        return int(rerank)

    @staticmethod
    def _candidate(hit: Hit, source: Callable[[Hit], object] | None, what: str) -> object:
        item = source(hit) if source is not None else hit.label
        if item is None or (isinstance(item, str) and not item):
            raise InvalidInputError(
                f"index entry {hit.id} has no {what} to re-rank with: add entries with labels (image paths "
                "or texts), pass source=, or search with rerank=0"
            )
        return item

    # --- image-text matching --------------------------------------------------------------

    def itm_scores(self, images: object, texts: object, channel_order: str = "RGB") -> np.ndarray:
        """(N,) float32 match probabilities of image-text pairs from the package's ITM component:
        images[i] with texts[i], or one image with every text, or every image with one text."""
        imgs, txts = _as_list(images, "images"), _as_list(texts, "texts")
        if len(imgs) != len(txts) and 1 not in (len(imgs), len(txts)):
            raise InvalidInputError(
                f"{len(imgs)} images and {len(txts)} texts: give pairs, or one image or one text for all"
            )
        n = max(len(imgs), len(txts))
        txts = txts * n if len(txts) == 1 else txts
        if len(imgs) == 1:
            single = self._image_values(imgs, channel_order)
            return self._score(lambda a, b: {k: np.repeat(v, b - a, axis=0) for k, v in single.items()}, txts)
        return self._score(lambda a, b: self._image_values(imgs[a:b], channel_order), txts)

    def _score(self, features: Callable[[int, int], dict[str, np.ndarray]], texts: list) -> np.ndarray:
        """Match probabilities of texts[i] with the image whose path values `features(a, b)` gives
        for rows a..b, in chunks of the ITM graph's largest batch (image features are large)."""
        if self.itm is None:
            raise InvalidInputError(
                f"package {self.runner.manifest.name!r} has no ITM component (image-text matching)"
            )
        entry = self.runner.manifest.component(self.itm)
        chunk = entry.dims["batch"].max if "batch" in entry.dims else len(texts)
        out = []
        for a in range(0, len(texts), chunk):
            b = min(a + chunk, len(texts))
            values = features(a, b)
            ids, mask = self.runner.tokenizer.encode_batch(texts[a:b])
            feeds = {
                s.name: values[s.name] for s in entry.inputs if s.name not in ("input_ids", "attention_mask")
            }
            feeds.update(input_ids=ids, attention_mask=mask)
            logits = self.runner.run_batched(self.itm, feeds)[entry.outputs[0].name].astype(np.float64)
            # softmax(logits)[:, 1] as a logistic of the margin: no overflow for any margin
            out.append(0.5 * (1.0 + np.tanh((logits[:, 1] - logits[:, 0]) / 2)))
        return np.concatenate(out).astype(np.float32)

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
