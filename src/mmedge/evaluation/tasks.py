"""`mmedge eval`: task metrics of a pipeline on `--data` (torch-free)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.runtime.metrics import retrieval_metrics
from mmedge.runtime.retrieval import RetrievalPipeline, l2_normalize

CHUNK = 256


def _chunked(fn: Callable[[list[Any]], np.ndarray], items: list[Any]) -> np.ndarray:
    return np.concatenate([fn(items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)])


def evaluate(pipeline: object, data: str, limit: int | None = None) -> dict[str, Any]:
    """Text->image and image->text recall@1/@5 on `--data`; an identical scene counts as a hit."""
    from mmedge.data import load_data

    if not isinstance(pipeline, RetrievalPipeline):
        raise UnsupportedError(f"retrieval metrics need a retrieval package; got {pipeline!r}")
    runner = pipeline.runner
    items = load_data(data, image_size=pipeline.preprocess.image_size, limit=limit)
    return {"package": runner.manifest.name, "data": data, **evaluate_items(pipeline, items)}


def evaluate_items(pipeline: RetrievalPipeline, items: list) -> dict[str, Any]:
    """Retrieval metrics on loaded data items (image, text, key)."""
    runner = pipeline.runner
    if any(it.text is None for it in items):
        raise InvalidInputError("retrieval eval needs a caption per image; the data has images without text")
    img = _chunked(pipeline.embed_images, [it.image for it in items])
    txt = _chunked(pipeline.embed_texts, [it.text for it in items])
    metrics = retrieval_metrics(img, txt, [it.key for it in items])
    precisions = {c: runner.precision_of(c) for c in runner.manifest.components}
    return {"task": "retrieval", "precisions": precisions, **metrics}


def hard_negative_gallery(
    n: int, image_size: int, seed: int | None = None, edits: int = 1
) -> tuple[list, list, list, list]:
    """`n` held-out scenes and, for each, `edits` edits of one attribute of one object
    (`data.perturb`; a scene's first edit is the same whatever `edits` is): (query captions, their
    scene keys, gallery images (the n scenes, then each scene's edits), gallery keys)."""
    from mmedge.data import HELD_OUT_SEED, generate_scenes, perturb, render
    from mmedge.data.scenes import scene_key

    seed = HELD_OUT_SEED if seed is None else seed
    scenes = generate_scenes(n, seed, image_size)
    images, keys = [s.image for s in scenes], [s.key for s in scenes]
    for i, s in enumerate(scenes):
        rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(i, 7)))
        for _ in range(edits):
            edit = perturb(s.objects, rng)
            images.append(render(edit, image_size, rng))
            keys.append(scene_key(edit))
    return [s.caption for s in scenes], [s.key for s in scenes], images, keys


def evaluate_rerank(pipeline: object, n: int = 500, depth: int = 16, edits: int = 1) -> dict[str, Any]:
    """Text->image R@1 among hard negatives, contrastive only against ITM re-ranking.

    The gallery holds `n` held-out scenes and `edits` one-attribute edits of each ((1 + edits) * n
    images; several edits per scene put more near-duplicates in each query's top `depth`); each
    scene's caption is a query, and an image of the identical scene counts as a hit. Contrastive:
    the nearest image by cosine; re-ranked: the best of the contrastive top `depth` by the
    package's ITM match probability (`RetrievalPipeline.search(rerank=depth)`'s two stages).
    """
    if not isinstance(pipeline, RetrievalPipeline):
        raise UnsupportedError(f"re-ranking metrics need a retrieval package; got {pipeline!r}")
    if pipeline.itm is None:
        raise UnsupportedError(
            f"package {pipeline.runner.manifest.name!r} has no ITM component to re-rank with"
        )
    if n < 1 or depth < 1 or edits < 1:
        raise InvalidInputError("scene count, re-rank depth and edits per scene must be positive")
    texts, query_keys, images, keys = hard_negative_gallery(n, pipeline.preprocess.image_size, edits=edits)
    depth = min(depth, len(images))
    values = [pipeline._image_values(images[i : i + CHUNK], "RGB") for i in range(0, len(images), CHUNK)]
    gallery = {k: np.concatenate([v[k] for v in values]) for k in values[0]}
    img = l2_normalize(gallery[pipeline.runner.manifest.pipeline.paths["image"].output].astype(np.float32))
    txt = _chunked(pipeline.embed_texts, texts)
    top = np.argsort(-(txt @ img.T), axis=1, kind="stable")[:, :depth]  # (n, depth)
    itc_hits, rerank_hits = [], []
    for q, cands in enumerate(top):
        rows = lambda a, b, c=cands: {k: v[c[a:b]] for k, v in gallery.items()}  # noqa: E731
        probs = pipeline._score(rows, [texts[q]] * depth)
        itc_hits.append(keys[cands[0]] == query_keys[q])
        rerank_hits.append(keys[cands[int(np.argmax(probs))]] == query_keys[q])
    runner = pipeline.runner
    return {
        "task": "retrieval-rerank",
        "queries": n,
        "gallery": len(images),
        "edits_per_scene": edits,
        "depth": depth,
        "t2i_r1_contrastive": round(float(np.mean(itc_hits)), 4),
        "t2i_r1_rerank": round(float(np.mean(rerank_hits)), 4),
        "precisions": {c: runner.precision_of(c) for c in runner.manifest.components},
    }


def evaluate_modalities(pipeline: object, n: int = 500) -> dict[str, Any]:
    """Cross-modal R@1 of every further modality the package embeds (audio, depth, thermal, IMU) on
    `n` held-out paired scenes: each scene's recording (map, trace) is a query over the n images
    and over the n captions. A hit is a scene identical on what the query's modality carries
    (`data.modalities.CARRIES`: a depth map shows no colour); chance is the mean share of hits.
    A model trained on (image, modality) pairs only, as ImageBind, was never shown the texts."""
    from mmedge.data import HELD_OUT_SEED
    from mmedge.data.modalities import SAMPLE_RATE, generate_paired, modality_key

    if not isinstance(pipeline, RetrievalPipeline):
        raise UnsupportedError(f"cross-modal metrics need a retrieval package; got {pipeline!r}")
    further = [m for m in pipeline.modalities if m not in ("image", "text")]
    if not further:
        raise UnsupportedError(f"package {pipeline.runner.manifest.name!r} embeds images and texts only")
    if n < 1:
        raise InvalidInputError("scene count must be positive")
    scenes = generate_paired(n, HELD_OUT_SEED, pipeline.preprocess.image_size)
    targets = {
        "image": _chunked(pipeline.embed_images, [p.scene.image for p in scenes]),
        "text": _chunked(pipeline.embed_texts, [p.scene.caption for p in scenes]),
    }
    out: dict[str, Any] = {"task": "cross-modal", "scenes": n}
    for m in further:
        rate = SAMPLE_RATE if m == "audio" else None
        query = _chunked(
            lambda xs, m=m, r=rate: pipeline.embed(xs, m, sample_rate=r), [p.data(m) for p in scenes]
        )
        index: dict[Any, int] = {}
        ids = np.array([index.setdefault(modality_key(p.scene.objects, m), len(index)) for p in scenes])
        hits = ids[:, None] == ids[None, :]  # (n, n): scene j answers query i
        out[m] = {
            f"{m}_to_{t}_r1": round(float(hits[np.arange(n), np.argmax(query @ emb.T, axis=1)].mean()), 4)
            for t, emb in targets.items()
        }
        out[m]["chance"] = round(float(hits.mean()), 4)
    runner = pipeline.runner
    out["precisions"] = {c: runner.precision_of(c) for c in runner.manifest.components}
    return out


def evaluate_classification(pipeline: object, n: int = 600) -> dict[str, Any]:
    """Held-out accuracy of a classification package on synthetic data, per modality it has:

    - points: `primitive_clouds(n, HELD_OUT_SEED)`, classes `PRIMITIVES` (sphere, cube, ...);
    - audio, imu: `shape_signals(n, HELD_OUT_SEED, ...)`, one-object recordings and traces, classes
      the scene shapes (circle, square, triangle, star).

    Each truth is found among the package's labels by name, so their order is the package's own. A
    modality whose labels are not its synthetic classes (a ModelNet40 point head) is skipped with the
    reason; a package with no modality left is refused (UnsupportedError). Classes are balanced, so
    `chance` is 1 / classes."""
    from mmedge.data import HELD_OUT_SEED
    from mmedge.data.modalities import PRIMITIVES, SAMPLE_RATE, labelled_examples
    from mmedge.data.scenes import SHAPES
    from mmedge.runtime.classification import ClassificationPipeline

    if not isinstance(pipeline, ClassificationPipeline):
        raise UnsupportedError(f"classification metrics need a classification package; got {pipeline!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidInputError(f"item count must be a positive int, got {n!r}")
    out: dict[str, Any] = {"task": "classification", "n": int(n)}
    skipped: dict[str, str] = {}
    for m in pipeline.modalities:
        classes = PRIMITIVES if m == "points" else SHAPES  # what labelled_examples labels by
        labels = pipeline.labels[m]
        if sorted(labels) != sorted(classes):
            skipped[m] = (
                f"its labels {list(labels[:8])}{' ...' if len(labels) > 8 else ''} are not the synthetic "
                f"classes {list(classes)}"
            )
            continue
        items, truth, _ = labelled_examples(m, int(n), HELD_OUT_SEED)
        rate = SAMPLE_RATE if m == "audio" else None
        logits = _chunked(lambda xs, m=m, r=rate: pipeline.logits(xs, m, sample_rate=r), items)
        expected = np.array([labels.index(c) for c in classes])[truth]  # class index -> logit column
        out[m] = {
            "accuracy": round(float((np.argmax(logits, axis=1) == expected).mean()), 4),
            "chance": round(1 / len(labels), 4),
            "classes": len(labels),
        }
    if skipped and len(skipped) == len(pipeline.modalities):
        raise UnsupportedError(
            f"package {pipeline.runner.manifest.name!r}: the synthetic data cannot score it: "
            + "; ".join(f"{m}: {why}" for m, why in skipped.items())
        )
    if skipped:
        out["skipped"] = skipped
    runner = pipeline.runner
    out["precisions"] = {c: runner.precision_of(c) for c in runner.manifest.components}
    return out


def evaluate_zero_shot(pipeline: object, n: int = 200) -> dict[str, Any]:
    """Synthetic-scene checks of how a retrieval model reads short texts, as users query it:

    - `shape_accuracy`: zero-shot `classify` with the labels circle / square / triangle / star on
      the first `n` single-object held-out scenes (the package's label templates);
    - `short_query_r1`: text->image R@1 over 500 held-out scenes for every "a <colour> <shape>"
      query that some scene answers; a scene containing such an object counts as a hit.
    """
    from mmedge.data import HELD_OUT_SEED, generate_scenes, iter_scenes
    from mmedge.data.scenes import COLOURS, SHAPES

    if not isinstance(pipeline, RetrievalPipeline):
        raise UnsupportedError(f"zero-shot checks need a retrieval package; got {pipeline!r}")
    size = pipeline.preprocess.image_size
    singles = []
    for scene in iter_scenes(HELD_OUT_SEED, image_size=size):
        if len(scene.objects) == 1:
            singles.append(scene)
        if len(singles) == n:
            break
    labels = list(SHAPES)
    hits = [pipeline.classify(s.image, labels)[0].label == s.objects[0].shape for s in singles]
    scenes = generate_scenes(500, HELD_OUT_SEED, size)
    images = _chunked(pipeline.embed_images, [s.image for s in scenes])
    pairs = [(c, sh) for c in COLOURS for sh in SHAPES]
    texts = pipeline.embed_texts([f"a {c} {sh}" for c, sh in pairs])
    best = np.argmax(texts @ images.T, axis=1)  # (queries,)
    answered = [
        any(o.colour == c and o.shape == sh for o in scenes[int(b)].objects)
        for (c, sh), b in zip(pairs, best)
        if any(o.colour == c and o.shape == sh for s in scenes for o in s.objects)
    ]
    return {
        "shape_accuracy": round(float(np.mean(hits)), 4),
        "shape_scenes": len(hits),
        "short_query_r1": round(float(np.mean(answered)), 4),
        "short_queries": len(answered),
    }


VQA_KINDS = ("colour", "shape", "count")  # the default; position questions are asked when named


def _normalise(answer: str) -> str:
    return " ".join(answer.lower().replace(".", " ").replace(",", " ").split())


def evaluate_chat(
    pipeline: Any,
    data: str = "shapes:100",
    questions: int = 300,
    captions: int = 100,
    progress: Any = None,
    kinds: Sequence[str] = VQA_KINDS,
) -> dict[str, Any]:
    """VQA accuracy (the first `questions` of the scenes' questions of `kinds`) and caption
    exact-match on synthetic scenes.

    A caption is an exact match when the objects it names (size, colour, shape, position) are
    exactly the scene's; an answer is correct when it equals the expected words after lowercasing
    and dropping punctuation. Greedy decoding.
    """
    from mmedge.data import HELD_OUT_SEED, TRAIN_SEED, generate_scenes, parse_caption
    from mmedge.data.scenes import QA_KINDS, scene_key

    if isinstance(kinds, str) or not kinds or not set(kinds) <= set(QA_KINDS):
        raise InvalidInputError(f"question kinds must be some of {list(QA_KINDS)}, got {kinds!r}")

    if not isinstance(data, str) or not data.startswith(("shapes:", "train-shapes:")):
        raise InvalidInputError(f"chat eval needs synthetic scenes with questions (shapes:N), got {data!r}")
    try:
        n = int(data.split(":", 1)[1])
    except ValueError:
        raise InvalidInputError(f"bad data spec {data!r}; expected shapes:N") from None
    if n < 1 or questions < 0 or captions < 0:
        raise InvalidInputError("scene, question and caption counts must be positive")
    scenes = generate_scenes(n, TRAIN_SEED if data.startswith("train-") else HELD_OUT_SEED)
    asked = [(s, qa) for s in scenes for qa in s.qa if qa.kind in kinds][:questions]
    per_kind: dict[str, list[int]] = {k: [] for k in kinds}
    examples = []
    for i, (scene, qa) in enumerate(asked):
        got = pipeline.chat(scene.image, qa.question, max_new_tokens=4)
        per_kind[qa.kind].append(int(_normalise(got) == qa.answer))
        if len(examples) < 6:
            examples.append({"question": qa.question, "answer": got.strip(), "expected": qa.answer})
        if progress and (i + 1) % 50 == 0:
            progress(f"  {i + 1}/{len(asked)} questions")
    caps = []
    for scene in scenes[:captions]:
        text = pipeline.caption(scene.image, max_new_tokens=40)
        caps.append((text, int(scene_key(parse_caption(text)) == scene.key), scene.caption))
    total = [x for v in per_kind.values() for x in v]
    runner = pipeline.runner
    return {
        "task": "chat",
        "data": data,
        "questions": len(total),
        "vqa_accuracy": round(float(np.mean(total)), 4) if total else None,
        "vqa_by_kind": {k: round(float(np.mean(v)), 4) for k, v in per_kind.items() if v},
        "captions": len(caps),
        "caption_exact_match": round(float(np.mean([c[1] for c in caps])), 4) if caps else None,
        "examples": examples,
        "caption_examples": [{"caption": c[0], "truth": c[2]} for c in caps[:4]],
        "precisions": {c: runner.precision_of(c) for c in runner.manifest.components},
    }
