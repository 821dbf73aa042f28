"""`mmedge pack`: a device bundle, holding only what one target runs (docs/bundles.md).

A package holds everything the workstation made (fp32 and quantized graphs, builds for each
backend, reports). A bundle keeps, per component, the one precision it runs and the one file that
runs it on the target: the ORT build for "ort-cpu" (the Q/DQ graph with `portable`, or where the
component has no build), the Q/DQ graph for the CUDA and TensorRT execution providers and for
native TensorRT (whose engines the device builds on first use, as engines are tied to one GPU and
TensorRT version). Tokenizers and other runtime files come along; reports do not.

Each graph is written with its initializers in a `.data` file beside it (standard ONNX external
data), so the runtime hands them to ONNX Runtime as arrays over the verified bytes instead of
parsing and copying them (`onnx_files.read_model`). The bundle is a package like any other
(manifest, sha256 of every file, `bundle` section), written crash-safely and fully verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.runtime.backends.base import build_key
from mmedge.runtime.bundles import machine_arch
from mmedge.runtime.manifest import AUTO_ORDER, MANIFEST_NAME, EngineEntry, Manifest
from mmedge.runtime.package import Package, verify_package
from mmedge.runtime.sections import BUNDLE_TARGETS, BundleConfig

log = logging.getLogger(__name__)

EXTERNAL_THRESHOLD = 1024  # bytes: smaller initializers stay inside the graph


def pick_precision(available: list[str], wanted: str) -> str | None:
    """The precision a component runs in a bundle packed at `wanted`: `wanted` itself, else the next
    less compressed one it has (int4 -> int8 -> fp16 -> fp32), so an int4 bundle of a chat package
    runs its LLM at int4 and its encoders at int8."""
    order = AUTO_ORDER[AUTO_ORDER.index(wanted) :]
    return next((p for p in order if p in available), None)


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def keep_paths(m: Manifest, paths: Sequence[str]) -> Manifest:
    """The manifest without the pipeline paths missing from `paths`, the components only those paths
    use and their entries in the `modalities` and `classification` sections: a robot that embeds
    camera frames and IMU traces carries no audio encoder."""
    from mmedge.errors import IntegrityError
    from mmedge.runtime.modality_inputs import MODALITY_PATHS
    from mmedge.runtime.sections import ClassificationConfig, PipelineConfig

    have = m.pipeline.paths
    if unknown := sorted(set(paths) - set(have)):
        raise InvalidInputError(f"--paths {unknown} are not paths of {m.name}; it has {sorted(have)}")
    kept = {k: v for k, v in have.items() if k in paths}
    used = {step.component for path in kept.values() for step in path.steps}
    dropped = {step.component for k, path in have.items() if k not in kept for step in path.steps} - used
    sections: dict[str, Any] = {}
    if m.modalities is not None:
        gone = {k: None for k in MODALITY_PATHS if k not in kept}
        left = replace(m.modalities, **gone)
        sections["modalities"] = left if left.present() else None
    if m.classification is not None:
        sections["classification"] = ClassificationConfig(
            {k: v for k, v in m.classification.labels.items() if k in kept}
        )
    try:
        return replace(
            m,
            pipeline=PipelineConfig(kept, m.pipeline.image_tokens),
            components={n: c for n, c in m.components.items() if n not in dropped},
            **sections,
        )
    except IntegrityError as exc:
        raise InvalidInputError(
            f"--paths {sorted(paths)} leaves a package that does not work: {exc}"
        ) from None


def _plan(pkg: Package, target: str, precision: str, portable: bool) -> tuple[dict[str, str], dict[str, str]]:
    """(component -> precision, file to carry -> key it serves: "<component>.<precision>[.<variant>]")."""
    from mmedge.runtime.backends.ort import ort_target

    m = pkg.manifest
    builds = m.engines.get(ort_target("cpu")) if target == "ort-cpu" and not portable else None
    chosen: dict[str, str] = {}
    carried: dict[str, str] = {}
    for name, entry in m.components.items():
        p = pick_precision(list(entry.precisions), precision)
        if p is None:
            raise UnsupportedError(
                f"component {name!r} has no {precision} precision or a less compressed one (has "
                f"{sorted(entry.precisions)})"
            )
        chosen[name] = p
        key = build_key(name, p)
        if builds is not None and key in builds.files:
            for k, rel in builds.files.items():  # the build and its variants (llm.int4.prefill)
                if k == key or k.startswith(key + "."):
                    carried[rel] = k
        else:
            carried[entry.precisions[p].file] = key
    return chosen, carried


def _write_graph(pkg: Package, rel: str, out: Path) -> None:
    """Copy one verified graph into the bundle with its initializers in `<name>.data` beside it."""
    import onnx

    from mmedge.runtime.onnx_files import read_model

    verified = read_model(pkg.root, pkg.manifest, rel, check=False)  # verify_package checked it
    model = onnx.ModelProto()
    model.ParseFromString(verified.model)
    if verified.initializers:  # external data: put the bytes back into the tensors, then save anew
        from onnx import numpy_helper

        for tensor in model.graph.initializer:
            if tensor.name in verified.initializers:
                filled = numpy_helper.from_array(verified.initializers[tensor.name], tensor.name)
                tensor.CopyFrom(filled)
    dest = out / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(dest),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=PurePosixPath(rel).name + ".data",
        size_threshold=EXTERNAL_THRESHOLD,
        convert_attribute=False,
    )


def _runtime_files(m: Manifest, onnx_rels: set[str], external: set[str]) -> list[str]:
    """Listed files the runtime reads besides graphs: tokenizers, image-token tables and the like.
    Reports and graphs (with their external data) are left out."""
    return [
        rel
        for rel in m.files
        if rel not in onnx_rels and rel not in external and not rel.startswith("reports/")
    ]


def _external_files(pkg: Package, onnx_rels: list[str]) -> set[str]:
    """Every listed file that an ONNX model of the package keeps its tensors in."""
    import onnx

    from mmedge.runtime.onnx_files import external_ref, iter_tensors, parse_model

    found: set[str] = set()
    for rel in onnx_rels:
        model = parse_model(pkg.read_verified(rel), rel)
        for t in iter_tensors(model):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                found.add(external_ref(t, rel, pkg.manifest.files).location)
    return found


def pack_package(
    package: str | os.PathLike[str],
    out: str | os.PathLike[str],
    target: str = "ort-cpu",
    precision: str = "int8",
    portable: bool = False,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write the device bundle of `package` for `target` at `precision` to `out` (crash-safely);
    with `paths`, only those pipeline paths and what they use (`keep_paths`)."""
    from mmedge.export.package_writer import write_manifest
    from mmedge.runtime.onnx_files import onnx_files
    from mmedge.runtime.staging import check_replaceable, staged_dir
    from mmedge.runtime.store import resolve

    say = progress or log.info
    if target not in BUNDLE_TARGETS:
        raise InvalidInputError(f"target {target!r} is not one of {list(BUNDLE_TARGETS)}")
    if precision not in AUTO_ORDER:
        raise InvalidInputError(f"precision {precision!r} is not one of {list(AUTO_ORDER)}")
    if portable and target != "ort-cpu":
        raise InvalidInputError("--portable applies to the ort-cpu target (the others carry portable graphs)")
    src = resolve(package)
    out_path = check_replaceable(
        out, lambda p: (p / MANIFEST_NAME).is_file(), "device bundle", force=force
    ).absolute()
    if out_path == Path(src).absolute():
        raise InvalidInputError("--out must not be the package itself; a bundle is written beside it")
    say(f"verifying {src}")
    pkg = verify_package(src)
    if pkg.manifest.bundle is not None:
        raise UnsupportedError(
            f"{src} is already a device bundle (for {pkg.manifest.bundle.target}); pack the full package"
        )
    if paths is not None:
        pkg = replace(pkg, manifest=keep_paths(pkg.manifest, paths))
    m = pkg.manifest
    chosen, carried = _plan(pkg, target, precision, portable)
    by_key = {k: rel for rel, k in carried.items()}
    graphs = onnx_files(m)
    keep = _runtime_files(m, set(graphs), _external_files(pkg, graphs))
    engines: dict[str, EngineEntry] = {}
    if target == "ort-cpu" and not portable:
        from mmedge.runtime.backends.ort import ort_target

        old = m.engines.get(ort_target("cpu"))
        files = {k: rel for k, rel in by_key.items() if old is not None and old.files.get(k) == rel}
        if old is not None and files:
            engines[ort_target("cpu")] = EngineEntry(
                old.backend, old.version, old.device, old.settings, files
            )
    runtime = {"onnxruntime": _ort_version(), "machine": machine_arch()} if engines else {}
    manifest_sha = hashlib.sha256((pkg.root / MANIFEST_NAME).read_bytes()).hexdigest()
    with staged_dir(out_path) as tmp:
        for rel in sorted(carried):
            say(f"  {carried[rel]:<24} {rel}")
            _write_graph(pkg, rel, tmp)
        for rel in keep:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(pkg.read_verified(rel))
        components = {
            name: replace(
                entry,
                precisions={
                    chosen[name]: replace(
                        entry.precisions[chosen[name]], file=by_key[build_key(name, chosen[name])]
                    )
                },
            )
            for name, entry in m.components.items()
        }
        bundle = BundleConfig(
            target=target,
            precision=precision,
            runtime=runtime,
            fp32_sha256={
                name: m.files[entry.precisions["fp32"].file].sha256
                for name, entry in m.components.items()
                if "fp32" in entry.precisions
            },
            source={
                "name": m.name,
                "manifest_sha256": manifest_sha,
                "packed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
        write_manifest(tmp, replace(m, components=components, engines=engines, bundle=bundle))
        say("verifying the bundle")
        verify_package(tmp)
    size = sum(f.stat().st_size for f in out_path.rglob("*") if f.is_file())
    return {
        "bundle": str(out_path),
        "target": target,
        "precisions": chosen,
        "files": by_key,
        "bytes": size,
        "source_bytes": sum(e.size for e in m.files.values()),
    }
