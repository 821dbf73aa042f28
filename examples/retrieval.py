"""Index a folder of images and search it with text, using only the torch-free runtime.

python examples/retrieval.py PACKAGE_OR_NAME IMAGE_FOLDER "a red circle"
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmedge import sdk


def main(package: str, folder: str, query: str) -> list[tuple[str, float]]:
    pipe = sdk.Pipeline(package)  # verifies the package; int8 where it was calibrated
    files = sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    pipe.add_images(files, labels=files)
    hits = pipe.search(query, k=3)
    for h in hits:
        print(f"{h.score:.3f}  {h.label}")
    return [(h.label or "", h.score) for h in hits]


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
