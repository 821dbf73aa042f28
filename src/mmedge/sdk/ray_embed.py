"""Batch embedding on Ray Data: an image folder or a JSONL file -> Parquet rows (id, path, vector).

The listing is read where the command runs, by the reader behind `--data` (a folder's images sorted
by name, a JSONL file's lines in order with paths relative to the file): item i gets id i. Ray Data
splits the listing into blocks; a pool of actors, each holding one opened pipeline, decodes and
embeds a batch at a time, and Ray's Parquet writer writes the rows. The images and the output folder
must be at the same paths on every node (a shared file system). Ray is imported only when called.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError, MmedgeError, UnsupportedError
from mmedge.runtime.backends import DEFAULT_BACKEND
from mmedge.runtime.retrieval import MAX_BATCH_ITEMS, RetrievalPipeline
from mmedge.runtime.staging import check_replaceable, staged_dir
from mmedge.sdk.ray_cluster import PackageRef, connect, typed_cause

COLUMNS = ("id", "path", "vector")
ROWS_PER_FILE = 100_000  # ~50 MB of 128-d vectors: few files, each a size Parquet readers like


@dataclass(frozen=True)
class EmbeddedSet:
    """What a batch embedding wrote."""

    out: Path
    images: int
    dim: int
    files: int
    seconds: float  # from the first block to the committed folder (Ray's start-up excluded)

    def summary(self) -> dict[str, object]:
        return {
            "out": str(self.out),
            "images": self.images,
            "dim": self.dim,
            "files": self.files,
            "seconds": round(self.seconds, 3),
        }


def listing(source: str | os.PathLike[str]) -> list[str]:
    """The image paths of a folder or a JSONL file, in id order (the `--data` reader's order)."""
    from mmedge.data import load_data

    spec = os.fspath(source)
    if spec.startswith(("shapes:", "train-shapes:")):
        raise InvalidInputError("a Ray batch embedding reads an image folder or a JSONL file, not shapes:N")
    return [str(item.image) for item in load_data(spec)]


def embed_to_parquet(
    package: str | os.PathLike[str],
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    actors: int = 2,
    batch_size: int = 64,
    threads: int = 1,
    backend: str = DEFAULT_BACKEND,
    precision: str = "auto",
    address: str | None = None,
    force: bool = False,
) -> EmbeddedSet:
    """Embed every image of `source` on Ray with `actors` pipelines (`threads` intra-op threads and
    as many reserved CPUs each) and write Parquet files to the folder `out`, replaced whole and
    atomically when every row is written. `address` (else $RAY_ADDRESS) names a running instance."""
    for name, value in (("actors", actors), ("batch_size", batch_size), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
    if batch_size > MAX_BATCH_ITEMS:
        raise InvalidInputError(f"batch_size {batch_size} is over the pipeline's limit of {MAX_BATCH_ITEMS}")
    ref = PackageRef.of(package)
    if ref.task != "retrieval":
        raise UnsupportedError(f"{ref.name!r} is a {ref.task} package; embedding needs a retrieval package")
    paths = listing(source)
    target = check_replaceable(out, _holds_parquet, "embedding folder", force)
    connected = connect(address)
    import ray
    import ray.data

    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.raise_original_map_exception = True  # a node's own error, not UserCodeException
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        start = time.perf_counter()
        rows = ray.data.from_items([{"id": i, "path": p} for i, p in enumerate(paths)])
        vectors = rows.map_batches(
            _Embedder,
            fn_constructor_kwargs={
                "ref": ref,
                "backend": backend,
                "precision": precision,
                "threads": threads,
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=threads,
            batch_format="numpy",
        )
        with staged_dir(target) as tmp:
            vectors.write_parquet(str(tmp), min_rows_per_file=ROWS_PER_FILE)
            files = sorted(tmp.glob("*.parquet"))
            written, dim = _rows_and_dim(files)
            if written != len(paths):
                raise MmedgeError(f"Ray wrote {written} rows for {len(paths)} images; nothing was kept")
        return EmbeddedSet(target.absolute(), len(paths), dim, len(files), time.perf_counter() - start)
    except ray.exceptions.RayError as exc:
        cause = typed_cause(exc)
        if cause is None:
            raise
        raise cause from None  # the node's own error (a bad image, a missing package), not Ray's wrapper
    finally:
        if connected:
            ray.shutdown()


def read_embeddings(out: str | os.PathLike[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(ids, paths, (N, D) float32 vectors) of a folder `embed_to_parquet` wrote, sorted by id."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.fspath(out), columns=list(COLUMNS)).sort_by("id")
    ids = table.column("id").to_numpy()
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32, copy=False)
    return ids, [str(p) for p in table.column("path").to_pylist()], vectors


class _Embedder:
    """One pipeline per actor, opened once; a batch of {id, path} -> a table of {id, path, vector}."""

    def __init__(self, ref: PackageRef, backend: str, precision: str, threads: int):
        self.error: MmedgeError | None = None
        try:
            pipe = ref.open(backend, precision, threads)
            assert isinstance(pipe, RetrievalPipeline)  # the driver checked the task
            self.pipe = pipe
        except MmedgeError as exc:
            # Raised with the first batch, which carries it to the driver: an error here would only
            # kill the actor, and Ray would start it again.
            self.error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        if self.error is not None:
            raise self.error
        paths = [str(p) for p in batch["path"]]
        vectors = self.pipe.embed_images(paths)
        flat = pa.array(vectors.reshape(-1), pa.float32())
        return pa.table(
            {
                "id": pa.array(batch["id"], pa.int64()),
                "path": pa.array(paths, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
            }
        )


def _holds_parquet(folder: Path) -> bool:
    """An earlier embedding's output: Parquet files and nothing else."""
    return all(p.is_file() and p.suffix == ".parquet" for p in folder.iterdir())


def _rows_and_dim(files: list[Path]) -> tuple[int, int]:
    import pyarrow.parquet as pq

    if not files:
        return 0, 0
    vector = pq.read_schema(files[0]).field("vector").type
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files), int(vector.list_size)
