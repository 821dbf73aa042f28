"""Batch embedding of an image folder: `mmedge embed --ray` (Ray Data, an actor pool) against one
process (not in the test suite). Both embed the same images with the same package; the script checks
that they agree (same ids and paths, vectors within 1e-6) and times each, alternating.

The package is `clip-tiny` from the model store (after `mmedge demo`) when present, else a
random-weight one made here (init_checkpoint + export; fp32; speed does not depend on the weights).
Images: N synthetic scenes written as 224x224 PNGs, as `mmedge data scenes N` writes them.

    .venv/bin/python benchmarks/ray_embed.py --images 500 --runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def package(work: Path) -> Path:
    from mmedge.runtime.store import list_packages, model_home

    if "clip-tiny" in list_packages():
        return model_home() / "clip-tiny"
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_checkpoint

    ckpt = init_checkpoint("clip-tiny", work / "clip-tiny-ckpt", seed=0, force=True)
    export_model(ckpt, work / "clip-tiny", force=True)
    return work / "clip-tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3, help="alternating runs of each")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    import ray

    from mmedge import sdk
    from mmedge.data.export import write_scenes
    from mmedge.sdk.ray_embed import embed_to_parquet, listing, read_embeddings

    work = Path(tempfile.mkdtemp(prefix="mmedge-ray-bench-"))
    pkg = package(work)
    write_scenes(args.images, work / "images", image_size=224, seed=3, held_out=True)
    paths = listing(work / "images")

    start = time.perf_counter()
    ray.init(
        num_cpus=args.cpus, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False
    )
    ray_start = time.perf_counter() - start

    single: list[float] = []
    on_ray: list[float] = []
    reference = np.empty(0)
    for _ in range(args.runs):
        start = time.perf_counter()  # one process: open (verify) the package, embed batch by batch
        pipe = sdk.Pipeline(pkg, threads=args.cpus)
        reference = np.vstack(
            [pipe.embed_images(paths[i : i + args.batch_size]) for i in range(0, len(paths), args.batch_size)]
        )
        single.append(time.perf_counter() - start)

        start = time.perf_counter()  # Ray: verify here, open one pipeline per actor, embed, write Parquet
        embed_to_parquet(pkg, work / "images", work / "out", actors=args.actors, batch_size=args.batch_size)
        on_ray.append(time.perf_counter() - start)
    ray.shutdown()

    ids, got_paths, vectors = read_embeddings(work / "out")
    assert ids.tolist() == list(range(len(paths))) and got_paths == paths
    diff = float(np.abs(vectors - reference).max())
    assert diff <= 1e-6, diff
    figures = {
        "images": len(paths),
        "package": str(pkg),
        "ray_start_s": round(ray_start, 2),
        "single_process_s": [round(t, 2) for t in single],
        "ray_s": [round(t, 2) for t in on_ray],
        "single_process_median_s": round(statistics.median(single), 2),
        "ray_median_s": round(statistics.median(on_ray), 2),
        "max_abs_diff": diff,
        "actors": args.actors,
        "batch_size": args.batch_size,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
