"""The retrieval and classification verbs (`mmedge embed`, `search`, `classify`): inputs of any
modality the package has, from files, a ROS bag, Ray or the synthetic scenes."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmedge.errors import MmedgeError
from mmedge.sdk.verbs import _note, _over_rosbag, _pipeline, _ray_args, _rosbag_args


def cmd_embed(a: argparse.Namespace) -> object:
    from mmedge.errors import InvalidInputError

    if _ray_args(a, ("actors", "batch_size")):
        if a.text or a.rosbag or len(a.images) != 1 or not a.out:
            raise InvalidInputError(
                "--ray embeds one SRC (an image folder or a JSONL file) into --out DIR: "
                "mmedge embed PKG --ray SRC --out DIR (no --text or --rosbag)"
            )
        from mmedge.sdk.ray_embed import embed_to_parquet

        return embed_to_parquet(
            a.package,
            a.images[0],
            a.out,
            actors=2 if a.actors is None else a.actors,
            batch_size=64 if a.batch_size is None else a.batch_size,
            threads=a.threads or 1,
            backend=a.backend,
            precision=a.precision,
            address=a.ray_address,
        ).summary()
    if a.text and (a.images or a.rosbag):
        raise InvalidInputError("give image files, --rosbag or --text (repeatable), not several")
    if a.modality not in ("image", "text"):
        if a.text or a.rosbag or not a.images:
            raise InvalidInputError(f"--modality {a.modality} embeds files of that modality: give them")
        emb = _pipeline(a).embed([_modality_input(f, a.modality) for f in a.images], a.modality)
        return _embeddings_out(a, emb)
    if a.text:
        _rosbag_args(a, inputs=True)  # refuses --topic and friends without a bag
    elif _rosbag_args(a, inputs=bool(a.images)):
        p = _pipeline(a)
        return _over_rosbag(a, p, lambda rgb: {"embedding": p.embed_images([rgb])[0].tolist()})
    p = _pipeline(a)
    return _embeddings_out(a, p.embed_texts(a.text) if a.text else p.embed_images(a.images))


def _embeddings_out(a: argparse.Namespace, emb: Any) -> dict[str, object]:
    import numpy as np

    if a.out:
        Path(a.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        np.save(a.out, emb)
        return {"shape": list(emb.shape), "out": a.out}
    return {"embeddings": emb.tolist()} if a.json else {"shape": list(emb.shape)}


def _modality_input(path: str, modality: str) -> object:
    """A file of a further modality as the runtime takes it: audio files and PNG maps by path (the
    runtime decodes them, within its limits); a .npy array (maps, IMU traces, point clouds) loaded
    without pickle."""
    import numpy as np

    from mmedge.errors import InvalidInputError

    if path.lower().endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{path!r} is not a readable .npy array: {exc}") from None
    if modality == "imu":
        raise InvalidInputError(f"an IMU trace is a (6, T) .npy array; got {path!r}")
    if modality == "points":
        raise InvalidInputError(f"a point cloud is an (N, 3 + F) .npy array; got {path!r}")
    if modality == "video":
        raise InvalidInputError(
            f"a video clip is a (T, H, W, 3) uint8 .npy array of decoded RGB frames; got {path!r}"
        )
    return path


def cmd_search(a: argparse.Namespace) -> object:
    from mmedge.errors import InvalidInputError

    if a.query is not None and a.image is not None:
        raise InvalidInputError("give a text query or --image, not both")
    if a.modality not in (None, "text") and a.image is not None:
        raise InvalidInputError("--image is an image query; with --modality the query is the positional file")
    if a.add_modality and (a.add or "").partition(":")[0] not in ("shapes", "train-shapes"):
        raise InvalidInputError("--add-modality indexes synthetic scenes' paired data: use --add shapes:N")
    p = _pipeline(a)
    if a.index:
        p.open_index(a.index, create=bool(a.add))  # searching alone never creates an index
    out: dict[str, object] = {}
    if a.add and a.add_modality:
        out.update(added=_add_paired(p, a.add, a.add_modality))
        if a.index:
            p.index.save()
    elif a.add:
        from mmedge.data import load_data

        items = load_data(a.add)
        if a.skip_bad:
            items, bad = _readable(items)
            out["skipped_unreadable"] = bad
        labels = [str(it.image) if isinstance(it.image, str) else (it.text or "") for it in items]
        have = p.index.find_labels([lab for it, lab in zip(items, labels) if isinstance(it.image, str)])
        new = [(it, lab) for it, lab in zip(items, labels) if not (isinstance(it.image, str) and lab in have)]
        if new:
            p.add_images([it.image for it, _ in new], labels=[lab for _, lab in new])
        out.update(added=len(new), already_indexed=len(items) - len(new))
        if a.index:
            p.index.save()
    if a.remove:
        out["removed"] = p.index.remove(a.remove)
        if a.index:
            p.index.save()
    if a.query is None and a.image is None:
        return {**out, "indexed": len(p.index)}
    if a.modality not in (None, "image", "text"):
        query: object = _modality_input(a.query, a.modality)
        hits = p.search(query, k=a.k, modality=a.modality, rerank=a.rerank)
    else:
        as_image = a.image is not None or a.modality == "image"
        hits = p.search(a.image if a.image is not None else a.query, k=a.k, image=as_image, rerank=a.rerank)
    return {
        **out,
        "query": a.query if a.image is None else a.image,
        "hits": [
            {"id": h.id, "score": round(h.score, 4), "label": h.label}
            | ({} if h.itm is None else {"itm": round(h.itm, 4)})
            for h in hits
        ],
    }


def _add_paired(p: Any, spec: str, modalities: list[str]) -> dict[str, int]:
    """Index each synthetic scene of `spec` in every one of `modalities` (labels 'scene I (M)')."""
    from mmedge.data import load_data
    from mmedge.data.modalities import SAMPLE_RATE
    from mmedge.data.sources import load_modality_data
    from mmedge.errors import InvalidInputError

    unknown = sorted(set(modalities) - set(p.modalities))
    if unknown:
        raise InvalidInputError(f"--add-modality {unknown}: the package embeds {', '.join(p.modalities)}")
    added = {}
    for m in modalities:
        if m in ("image", "text"):
            items = load_data(spec, image_size=p.preprocess.image_size)
            data: list = [it.image if m == "image" else it.text for it in items]
        else:
            data = load_modality_data(spec, m, p.preprocess.image_size) or []
        rate = SAMPLE_RATE if m == "audio" else None
        labels = [f"scene {i} ({m})" for i in range(len(data))]
        for i in range(0, len(data), 256):
            p.add(data[i : i + 256], m, labels=labels[i : i + 256], sample_rate=rate)
        added[m] = len(data)
    return added


def _readable(items: list[Any]) -> tuple[list[Any], list[str]]:
    """The items whose image loads, and `path: reason` of those that do not."""
    from mmedge.runtime.images import load_image

    good, bad = [], []
    for it in items:
        try:
            load_image(it.image)
            good.append(it)
        except MmedgeError as exc:
            bad.append(f"{it.image}: {exc}")
    for line in bad:
        _note(f"skipped {line}")
    return good, bad


def _labels_out(labels: Iterable[Any]) -> list[dict[str, object]]:
    return [{"label": r.label, "score": round(r.score, 4)} for r in labels]


def cmd_classify(a: argparse.Namespace) -> object:
    from mmedge.errors import InvalidInputError
    from mmedge.runtime.classification import DEFAULT_TOP_K, check_top_k

    top_k = None if a.top_k is None else check_top_k(a.top_k)
    p = _pipeline(a)
    if p.runner.manifest.task == "retrieval":
        if a.modality not in (None, "image") or a.sample_rate is not None:
            raise InvalidInputError(
                "a retrieval package classifies an image zero-shot; --modality and --sample-rate are for "
                "classification packages"
            )
        if a.labels is None or len(a.files) != 1:
            raise InvalidInputError("zero-shot classification takes one image and --labels (comma-separated)")
        labels = [s.strip() for s in a.labels.split(",") if s.strip()]
        return {"image": a.files[0], "labels": _labels_out(p.classify(a.files[0], labels)[:top_k])}
    if a.labels is not None:
        raise InvalidInputError(
            "--labels is for zero-shot classification (retrieval packages); this package classifies into "
            "its own labels"
        )
    modality = a.modality
    if modality is None:
        if len(p.modalities) != 1:
            raise InvalidInputError(f"give --modality: the package classifies {', '.join(p.modalities)}")
        modality = p.modalities[0]
    items = [_modality_input(f, modality) for f in a.files]
    rows = p.classify(items, modality, top_k=top_k or DEFAULT_TOP_K, sample_rate=a.sample_rate)
    return {
        "modality": modality,
        "results": [{"file": f, "labels": _labels_out(r)} for f, r in zip(a.files, rows)],
    }
