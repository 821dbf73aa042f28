"""`sdk.Pipeline(...)`: open a package by name or path and return the pipeline for its task."""

from __future__ import annotations

import os

from mmedge.runtime.backends import DEFAULT_BACKEND
from mmedge.runtime.backends.base import SessionOptions
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.pipelines import AnyPipeline, open_pipeline
from mmedge.runtime.signing import trust_policy
from mmedge.runtime.store import resolve


def Pipeline(  # noqa: N802 - a factory that reads as the class users expect
    name_or_path: str | os.PathLike[str],
    backend: str = DEFAULT_BACKEND,
    precision: str = "auto",
    threads: int = 0,
    device: str = "cpu",
    trust: str | None = None,
    trusted_keys: str | os.PathLike[str] | None = None,
) -> AnyPipeline:
    """Verify a package and return its task pipeline: retrieval, image chat or text generation.

    `precision="auto"` takes the best precision each component has (int4, then int8, fp16, fp32).
    `trust="signed"` refuses (IntegrityError) a package whose manifest is not signed by one of the
    public keys in the file `trusted_keys`; `trust="hashes"` checks the files' hashes only.
    `trusted_keys` alone means "signed"; what is left None comes from MMEDGE_TRUST and
    MMEDGE_TRUSTED_KEYS (default: "hashes").
    """
    runner = ComponentRunner(
        resolve(name_or_path),
        backend=backend,
        precision=precision,
        options=SessionOptions(threads=threads, device=device),
        trust=trust_policy(trust, trusted_keys),
    )
    return open_pipeline(runner)
