"""`mmedge build`: backend-specific builds recorded in the manifest's engine table.

`--backend ort` writes ORT-optimized graphs (fusions, integer GEMMs) valid for this ORT version;
`--backend tensorrt` writes TensorRT engines with one optimization profile from the manifest's
dim ranges. Both are keyed by target and written crash-safely like export and calibrate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmedge.builds import make_builder
from mmedge.builds.base import BuildRequest, without_builds_of
from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.runtime.backends import DEFAULT_BACKEND
from mmedge.runtime.manifest import EngineEntry
from mmedge.runtime.package import verify_package
from mmedge.runtime.signing import drop_signature, unsigned_note
from mmedge.runtime.staging import staged_update

log = logging.getLogger(__name__)


def build_package(
    package: str | Path,
    backend: str = DEFAULT_BACKEND,
    precision: str = "auto",
    threads: int = 2,
    progress: Callable[[str], None] | None = None,
    prefill: bool = True,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build every component at `precision` (auto = every precision present) for `backend`.

    `settings` are TensorRT's build settings (`runtime.trt_plan.DEVICE_SETTINGS`: workspace,
    version- and hardware-compatible engines); other backends take none.
    For ORT, a weight-only LLM also gets a prefill build with int8 GEMMs (`ort_prefill`; `prefill`
    False skips it and its extra int8 copy of the weights)."""
    from mmedge.export.package_writer import write_manifest
    from mmedge.runtime.store import resolve

    say = progress or log.info
    builder = make_builder(backend)
    pkg = verify_package(resolve(package))
    say(f"updating {pkg.root} in place (atomically)")
    if all(set(c.precisions) == {"fp32"} for c in pkg.manifest.components.values()):
        say(f"note: {pkg.manifest.name} has only fp32 graphs; `mmedge calibrate` quantizes (and builds) them")
    with staged_update(pkg.root) as tmp:
        unsigned = drop_signature(tmp)
        if unsigned:
            say(unsigned_note(pkg.root))
        if settings and backend != "tensorrt":
            raise InvalidInputError(f"build settings {sorted(settings)} are TensorRT's; {backend} takes none")
        options = {"prefill": prefill, "settings": dict(settings or {})}
        result = builder.build(BuildRequest(pkg, tmp, precision, threads, say, options))
        files = dict(result.files)
        if not files:
            raise UnsupportedError(f"no component has a {precision!r} precision to build")
        old = pkg.manifest.engines.get(result.target)
        same = old is not None and (old.version, old.device, old.settings) == (
            result.version,
            result.device,
            result.settings,
        )
        if old is not None and same:
            # building some precisions keeps the target's other builds (their files stay in the package);
            # a rebuilt one drops its old variants ("llm.int4" drops "llm.int4.prefill" unless rebuilt too)
            rebuilt = tuple(f"{k}." for k in files)
            stale = {k for k in old.files if k.startswith(rebuilt) and k not in files}
            kept = without_builds_of(tmp, {result.target: old}, stale).get(result.target)
            files = {
                **{k: v for k, v in (kept.files if kept else {}).items() if (tmp / v).is_file()},
                **files,
            }
        entry = EngineEntry(backend, result.version, result.device, result.settings, files)
        engines = {**pkg.manifest.engines, result.target: entry}
        write_manifest(tmp, replace(pkg.manifest, engines=engines))
        verify_package(tmp)
    out = {"backend": backend, "target": result.target, "builds": result.report}
    return {**out, "signature_removed": True} if unsigned else out
