"""Write synthetic scenes to disk as sample inputs: PNG images and a captions JSONL beside them."""

from __future__ import annotations

import json
from pathlib import Path

from mmedge.data.scenes import HELD_OUT_SEED, TRAIN_SEED, generate_scenes
from mmedge.errors import InvalidInputError, require_opencv

MAX_SCENES = 100_000


def write_scenes(
    count: int, out: str | Path, image_size: int = 224, seed: int | None = None, held_out: bool = True
) -> Path:
    """Write `count` scenes as `scene_00000.png ...` and `captions.jsonl` ({"image", "text"} lines,
    the `--data` format); returns the JSONL path. Existing files other than these are kept."""
    cv2 = require_opencv()

    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SCENES:
        raise InvalidInputError(f"count must be an int in [1, {MAX_SCENES}], got {count!r}")
    if not 16 <= image_size <= 2048:
        raise InvalidInputError(f"image size must be in [16, 2048], got {image_size}")
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    scenes = generate_scenes(
        count, seed if seed is not None else (HELD_OUT_SEED if held_out else TRAIN_SEED), image_size
    )
    lines = []
    for i, scene in enumerate(scenes):
        name = f"scene_{i:05d}.png"
        if not cv2.imwrite(str(folder / name), scene.image[..., ::-1]):  # OpenCV writes BGR
            raise InvalidInputError(f"could not write {folder / name}")
        lines.append(json.dumps({"image": name, "text": scene.caption}))
    jsonl = folder / "captions.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl
