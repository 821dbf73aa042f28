"""Embed an image folder (or a JSONL file of {"image", "text"} lines) on Ray into Parquet, then read it
back and find each of the first images' nearest neighbours.

    python examples/ray_embed.py PACKAGE_OR_NAME SRC OUT_DIR [--address ADDR] [--actors N] [--batch-size N]

Needs the ray extra. Without --address (or RAY_ADDRESS) it starts a local Ray instance; with one, the
same script runs on that cluster (docs/ray.md: the package, SRC and OUT_DIR must be reachable on every
node). The same as `mmedge embed PACKAGE --ray SRC --out OUT_DIR`.
"""

from __future__ import annotations

import argparse

import numpy as np

from mmedge.sdk.ray_embed import embed_to_parquet, read_embeddings


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("source", help="an image folder or a JSONL file")
    ap.add_argument("out", help="folder for the Parquet files (replaced whole)")
    ap.add_argument("--address", default=None, help="a running Ray instance (default: $RAY_ADDRESS or local)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)

    written = embed_to_parquet(
        args.package,
        args.source,
        args.out,
        actors=args.actors,
        batch_size=args.batch_size,
        address=args.address,
    )
    print(written.summary())
    ids, paths, vectors = read_embeddings(written.out)
    scores = vectors[:3] @ vectors.T  # unit vectors: dot = cosine
    np.fill_diagonal(scores[:, :3], -np.inf)  # not itself
    for row, best in enumerate(scores.argmax(axis=1)):
        print(f"{ids[row]} {paths[row]} -> nearest {ids[best]} {paths[best]} ({scores[row, best]:.4f})")
    return written.summary()


if __name__ == "__main__":
    main()
