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

import numpy as np

from mmedge.errors import IntegrityError, UnsupportedError
from mmedge.runtime.manifest import ComponentEntry, EngineEntry
from mmedge.runtime.package import Package, verify_package
from mmedge.runtime.staging import staged_update

log = logging.getLogger(__name__)


def _profile(entry: ComponentEntry) -> dict[str, list[list[int]]]:
    """(min, opt, max) shapes per input from the manifest's symbolic dims."""
    out = {}
    for spec in entry.inputs:
        shapes = []
        for which in ("min", "opt", "max"):
            shapes.append([getattr(entry.dims[d], which) if isinstance(d, str) else d for d in spec.shape])
        out[spec.name] = shapes
    return out


def _precisions(entry: ComponentEntry, precision: str) -> list[str]:
    if precision == "auto":
        return sorted(entry.precisions)
    return [precision] if precision in entry.precisions else []


BUILD_MAX_REL_ERROR = 1e-3  # the ORT passes are exact rewrites; a larger gap is a bug, not noise


def _check_build(source: Path, built: Path, pkg: Package, entry: ComponentEntry, threads: int) -> float:
    """Run the built graph and its source on the same sample inputs; raise unless they agree.

    Returns the largest output error relative to the output's largest magnitude. (Cosine alone is
    too lenient: on random weights a wrong head count still scores 0.999.)
    """
    from mmedge.calibration.accuracy import ort_session, run_outputs
    from mmedge.calibration.ort_build import is_x86
    from mmedge.runtime.components import package_tokenizer, sample_feeds

    text = package_tokenizer(pkg) if any(s.name == "input_ids" for s in entry.inputs) else None
    feeds = [sample_feeds(entry, 2, text)]
    ref = run_outputs(ort_session(source, threads, uint8_activations=is_x86()), feeds)
    out = run_outputs(ort_session(built, threads), feeds)
    err = max(float(np.abs(out[k] - v).max() / max(np.abs(v).max(), 1e-12)) for k, v in ref.items())
    if not err <= BUILD_MAX_REL_ERROR:
        raise IntegrityError(f"{built.name}: the optimized graph disagrees with its source (relative error "
                             f"{err:.2e}, limit {BUILD_MAX_REL_ERROR:.0e}); please report this as a bug")
    return err


def build_package(package: str | Path, backend: str = "ort", precision: str = "auto", threads: int = 2,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build every component at `precision` (auto = every precision present) for `backend`."""
    from mmedge.export.package_writer import write_manifest
    from mmedge.sdk.store import resolve

    say = progress or log.info
    pkg = verify_package(resolve(package))
    if backend not in ("ort", "tensorrt"):
        raise UnsupportedError(f"backend {backend!r} is not supported; choose 'ort' or 'tensorrt'")
    report: dict[str, Any] = {"backend": backend, "builds": {}}
    with staged_update(pkg.root) as tmp:
        files: dict[str, str] = {}
        settings: dict[str, Any] = {}
        if backend == "ort":
            import onnxruntime as ort

            from mmedge.calibration.ort_build import optimize_for_ort
            from mmedge.runtime.backends.ort import ort_target

            target, version, device = ort_target("cpu"), ort.__version__, "CPUExecutionProvider"
            from mmedge.calibration.ort_build import MATMULNBITS_ACCURACY_LEVEL

            settings = {"level": "extended", "uint8_activations": "x86 only",
                        "matmulnbits_accuracy_level": MATMULNBITS_ACCURACY_LEVEL}
            for name, entry in pkg.manifest.components.items():
                for p in _precisions(entry, precision):
                    rel = f"builds/{target}/{name}.{p}.onnx"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    src = tmp / entry.precisions[p].file
                    ops = optimize_for_ort(src, tmp / rel, threads=threads)
                    err = _check_build(src, tmp / rel, pkg, entry, threads)
                    files[f"{name}.{p}"] = rel
                    report["builds"][f"{name}.{p}"] = {"file": rel, "ops": ops, "rel_error_vs_source": err}
                    say(f"built {name}.{p} for {target} (relative error vs source {err:.1e})")
        else:
            from mmedge.runtime.backends import tensorrt as trt_backend

            records = {}
            for name, entry in pkg.manifest.components.items():
                for p in _precisions(entry, precision):
                    trt_precision = "int8" if p == "int8" else ("fp16" if p == "fp16" else "fp32")
                    rel = f"engines/pending/{name}.{p}.plan"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    records[f"{name}.{p}"] = trt_backend.build_engine(
                        tmp / entry.precisions[p].file, tmp / rel, _profile(entry), precision=trt_precision,
                        timing_cache_path=tmp / "engines" / "timing.cache",
                    )
                    files[f"{name}.{p}"] = rel
            first = next(iter(records.values()))
            settings = {"workspace_bytes": first.get("workspace_bytes")}
            target = trt_backend.engine_target(settings)
            final = tmp / "engines" / target
            if final.exists():  # a rebuild for the same target replaces the old engines
                import shutil

                shutil.rmtree(final)
            (tmp / "engines" / "pending").rename(final)
            files = {k: v.replace("engines/pending/", f"engines/{target}/") for k, v in files.items()}
            version, device = str(first["version"]), str(first["device"])
            report["builds"] = records
        if not files:
            raise UnsupportedError(f"no component has a {precision!r} build to compile")
        old = pkg.manifest.engines.get(target)
        if old is not None and (old.version, old.device, old.settings) == (version, device, settings):
            # building some precisions keeps the target's other builds (their files stay in the package)
            files = {**{k: v for k, v in old.files.items() if (tmp / v).is_file()}, **files}
        engines = {**pkg.manifest.engines, target: EngineEntry(backend, version, device, settings, files)}
        write_manifest(tmp, replace(pkg.manifest, engines=engines))
        verify_package(tmp)
    report["target"] = target
    return report
