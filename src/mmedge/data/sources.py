"""What `--data` means everywhere: synthetic scenes, an image folder or a JSONL caption file."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.data.scenes import HELD_OUT_SEED, TRAIN_SEED, generate_scenes
from mmedge.errors import InvalidInputError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")  # the loader's formats
MAX_SYNTHETIC = 1_000_000
_SPEC_HELP = "expected 'shapes:N', 'train-shapes:N', a directory of images or a .jsonl file of {\"image\", \"text\"} lines"
_SHAPES_SPEC = re.compile(r"(train-)?shapes:(.*)", re.DOTALL)


@dataclass(frozen=True, eq=False)
class DataItem:
    """One image (RGB uint8 array or file path) with optional text; equal keys mean the same image."""

    image: np.ndarray | str
    text: str | None
    key: object | None


def load_data(spec: str, image_size: int = 64, limit: int | None = None) -> list[DataItem]:
    """Load `shapes:N` (held-out synthetic scenes), an image directory or a JSONL caption file.

    `train-shapes:N` draws from the training seed instead; calibration uses it so that the
    held-out scenes that `eval` scores are never seen before evaluation.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError(f"data spec must be a non-empty string; {_SPEC_HELP}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(f"limit must be a positive int or None, got {limit!r}")
    match = _SHAPES_SPEC.fullmatch(spec)
    if match:
        seed = TRAIN_SEED if match.group(1) else HELD_OUT_SEED
        return _load_shapes(match.group(2), spec, image_size, limit, seed)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InvalidInputError(f"data path {spec!r} does not exist; {_SPEC_HELP}")
    if path.is_dir():
        items = _load_folder(path)
    elif path.suffix.lower() == ".jsonl":
        items = _load_jsonl(path)
    else:
        raise InvalidInputError(f"data path {spec!r} is neither a directory nor a .jsonl file; {_SPEC_HELP}")
    return items if limit is None else items[:limit]


def load_modality_data(
    spec: str, modality: str, image_size: int = 64, limit: int | None = None, task: str = "retrieval"
) -> list | None:
    """A further modality's data for `shapes:N` / `train-shapes:N`: for a retrieval package the same
    scenes' depth maps, thermal frames, 16 kHz recordings, IMU traces or 2-frame clips
    (`data.modalities`); for a classification package, and for point clouds, the modality's
    synthetic classification examples (`labelled_examples`). None for other data, which carries
    images and texts only."""
    from mmedge.data.modalities import labelled_examples, make_paired

    match = _SHAPES_SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if not match:
        return None
    seed = TRAIN_SEED if match.group(1) else HELD_OUT_SEED
    n = _shapes_count(match.group(2), spec, limit)
    if modality == "points" or task == "classification":
        return labelled_examples(modality, n, seed)[0]
    return [make_paired(seed, i, image_size).data(modality) for i in range(n)]


def _shapes_count(count: str, spec: str, limit: int | None) -> int:
    """N of a `shapes:N` spec, checked, at most `limit`."""
    if not re.fullmatch(r"[0-9]+", count):
        raise InvalidInputError(f"bad data spec {spec!r}: N in 'shapes:N' must be a whole number")
    n = int(count)
    if not 1 <= n <= MAX_SYNTHETIC:
        raise InvalidInputError(f"bad data spec {spec!r}: N must be between 1 and {MAX_SYNTHETIC}")
    return n if limit is None else min(n, limit)


def _load_shapes(count: str, spec: str, image_size: int, limit: int | None, seed: int) -> list[DataItem]:
    """Synthetic scenes with their captions; keys identify identical scenes."""
    n = _shapes_count(count, spec, limit)
    return [DataItem(s.image, s.caption, s.key) for s in generate_scenes(n, seed, image_size)]


def _load_folder(folder: Path) -> list[DataItem]:
    """Image files directly inside `folder` (not recursive), sorted by name, without text."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise InvalidInputError(
            f"data folder {str(folder)!r} holds no image files; accepted extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)} (sub-folders are not searched)"
        )
    return [DataItem(path, None, path) for path in (os.path.abspath(p) for p in files)]


def _records(file: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed JSON) of each non-blank line of a JSONL file; `where` names file and line."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{str(file)!r} is not UTF-8 text: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no record
        where = f"{str(file)!r} line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{where} is not valid JSON: {exc.msg}") from exc


def _load_jsonl(file: Path) -> list[DataItem]:
    """Lines of {"image": path, "text": caption}; relative paths are taken from the file's folder."""
    base = file.parent
    items: list[DataItem] = []
    for where, record in _records(file):
        if not isinstance(record, dict):
            raise InvalidInputError(f"{where} must be a JSON object with 'image' and 'text'")
        missing = [k for k in ("image", "text") if k not in record]
        if missing:
            raise InvalidInputError(f"{where} is missing key(s) {', '.join(missing)}")
        image, text = record["image"], record["text"]
        if not isinstance(image, str) or not image:
            raise InvalidInputError(f"{where}: 'image' must be a non-empty string path, got {image!r}")
        if not isinstance(text, str):
            raise InvalidInputError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        path = os.path.abspath(base / Path(image).expanduser())
        if not os.path.isfile(path):
            raise InvalidInputError(f"{where}: image file {path!r} does not exist")
        items.append(DataItem(path, text, path))
    if not items:
        raise InvalidInputError(f"{str(file)!r} holds no records; {_SPEC_HELP}")
    return items


@dataclass(frozen=True)
class Conversation:
    """One image and its (question, answer) turns, from a LLaVA-style conversations record."""

    image: str
    turns: tuple[tuple[str, str], ...]


_IMAGE_TAG = re.compile(r"\s*<image>\s*")
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def load_conversations(spec: str) -> list[Conversation]:
    """A JSONL file of LLaVA-style records: {"image": path, "conversations": [{"from": "human",
    "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}. Turns alternate human / gpt,
    starting with human; the `<image>` tag is dropped (the model's prompt template places the image);
    relative image paths are taken from the file's folder."""
    path = Path(spec).expanduser()
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        raise InvalidInputError(f"conversation data {spec!r} must be an existing .jsonl file")
    out: list[Conversation] = []
    for where, record in _records(path):
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"]:
            raise InvalidInputError(f"{where} must be an object with an 'image' path and 'conversations'")
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns or len(turns) % 2:
            raise InvalidInputError(f"{where}: 'conversations' must be a non-empty list of human/gpt pairs")
        pairs = []
        for i in range(0, len(turns), 2):
            q, a = turns[i], turns[i + 1]
            ok = all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (q, a))
            if not ok or _ROLES.get(q.get("from")) != "human" or _ROLES.get(a.get("from")) != "gpt":
                raise InvalidInputError(
                    f"{where}: turn {i} must be human then gpt, each with a string 'value'"
                )
            question, answer = _IMAGE_TAG.sub(" ", q["value"]).strip(), a["value"].strip()
            if not question or not answer:
                raise InvalidInputError(f"{where}: turn {i} has an empty question or answer")
            pairs.append((question, answer))
        image = os.path.abspath(path.parent / Path(record["image"]).expanduser())
        if not os.path.isfile(image):
            raise InvalidInputError(f"{where}: image file {image!r} does not exist")
        out.append(Conversation(image, tuple(pairs)))
    if not out:
        raise InvalidInputError(f"{spec!r} holds no conversations")
    return out
