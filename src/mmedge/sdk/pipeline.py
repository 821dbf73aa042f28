"""`sdk.Pipeline(...)`: open a package by name or path and return the pipeline for its task."""

from __future__ import annotations

import os
from collections.abc import Sequence

from mmedge.errors import InvalidInputError
from mmedge.runtime.backends import DEFAULT_BACKEND
from mmedge.runtime.backends.base import SessionOptions
from mmedge.runtime.bundles import TARGET_RUNS
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.package import read_manifest
from mmedge.runtime.pipelines import AnyPipeline, open_pipeline
from mmedge.runtime.retrieval import RetrievalPipeline
from mmedge.runtime.signing import trust_policy
from mmedge.runtime.store import resolve


def Pipeline(  # noqa: N802 - a factory that reads as the class users expect
    name_or_path: str | os.PathLike[str],
    backend: str | None = None,
    precision: str = "auto",
    threads: int = 0,
    device: str | None = None,
    trust: str | None = None,
    trusted_keys: str | os.PathLike[str] | None = None,
    index: str | os.PathLike[str] | None = None,
    memory_budget_mb: float | None = None,
    preload: bool | str | Sequence[str] = False,
) -> AnyPipeline:
    """Verify a package and return its task pipeline: retrieval, image chat, text generation or
    classification (`runtime.classification.ClassificationPipeline`).

    `precision="auto"` takes the best precision each component has (int4, then int8, fp16, fp32).
    `trust="signed"` refuses (IntegrityError) a package whose manifest is not signed by one of the
    public keys in the file `trusted_keys`; `trust="hashes"` checks the files' hashes only.
    `trusted_keys` alone means "signed"; what is left None comes from MMEDGE_TRUST and
    MMEDGE_TRUSTED_KEYS (default: "hashes").

    `index` (retrieval packages) is where add_images / search keep vectors: a usearch directory
    (loaded if it exists; written by `p.index.save()`) or a Milvus URI such as
    "milvus-lite:///data/photos.db?collection=photos" or "milvus://host:19530/photos" (docs/indexes.md).
    Without it, an in-memory usearch index.

    `preload=True` loads every component now (each file checked as it loads), so that a bad or
    tampered file fails the open rather than the first call; `preload="image"` (or a list of paths
    and component names) loads only those, e.g. the image path of a camera loop.

    `memory_budget_mb` refuses (MemoryBudgetError) a package whose sessions would need more than
    that, estimated from its files, before anything loads.

    `backend` and `device` default to what a device bundle (`mmedge pack`) was packed for, else
    ONNX Runtime on the CPU. Files are checked as the components that use them load (the text
    tower of a CLIP package when texts are first embedded): docs/bundles.md.
    """
    location = resolve(_checked_location(name_or_path))
    if backend is None or device is None:
        bundle = read_manifest(location).bundle
        runs = TARGET_RUNS[bundle.target] if bundle is not None else (DEFAULT_BACKEND, "cpu")
        backend, device = backend or runs[0], device or runs[1]
    runner = ComponentRunner(
        location,
        backend=backend,
        precision=precision,
        options=SessionOptions(threads=threads, device=device),
        trust=trust_policy(trust, trusted_keys),
        memory_budget_mb=memory_budget_mb,
    )
    if preload is True:
        runner.preload()
    elif preload:
        runner.preload([preload] if isinstance(preload, str) else list(preload))
    pipe = open_pipeline(runner)
    if index is not None:
        if not isinstance(pipe, RetrievalPipeline):
            raise InvalidInputError(
                f"index= applies to retrieval packages; {runner.manifest.name!r} is a {runner.manifest.task} package"
            )
        pipe.open_index(index)
    return pipe


MAX_PATH_BYTES = 4096  # Linux PATH_MAX
MAX_NAME_BYTES = 255  # one path component (NAME_MAX)


def _checked_location(name_or_path: object) -> str | os.PathLike[str]:
    """A package name or path the file system can be asked about; else an error naming the problem."""
    if isinstance(name_or_path, os.PathLike):
        location = os.fspath(name_or_path)
    elif isinstance(name_or_path, str):
        location = name_or_path
    else:
        raise InvalidInputError(
            f"sdk.Pipeline takes a package name or path (str or os.PathLike), got {type(name_or_path).__name__}"
        )
    if not isinstance(location, str):
        raise InvalidInputError(f"package path must be text, got {type(location).__name__}")
    shown = repr(location[:80]) + ("..." if len(location) > 80 else "")
    if "\x00" in location:
        raise InvalidInputError(f"package path {shown} contains a NUL character")
    try:
        encoded = os.fsencode(location)
    except UnicodeEncodeError as exc:  # a lone surrogate has no file-system spelling
        raise InvalidInputError(f"package path {shown} is not valid Unicode: {exc.reason}") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidInputError(f"package path is {len(encoded)} bytes long; the limit is {MAX_PATH_BYTES}")
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest > MAX_NAME_BYTES:
        raise InvalidInputError(
            f"package path {shown} has a {longest}-byte name; the limit is {MAX_NAME_BYTES} bytes per name"
        )
    return name_or_path if isinstance(name_or_path, os.PathLike) else location
