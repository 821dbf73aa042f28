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
    from mmedge.builds.ort import is_x86
    from mmedge.builds.sessions import ort_session, run_outputs
    from mmedge.runtime.components import package_tokenizer, sample_feeds

    text = package_tokenizer(pkg) if any(s.name == "input_ids" for s in entry.inputs) else None
    feeds = [sample_feeds(entry, 2, text)]
    ref = run_outputs(ort_session(source, threads, uint8_activations=is_x86()), feeds)
    out = run_outputs(ort_session(built, threads), feeds)
    err = max(float(np.abs(out[k] - v).max() / max(np.abs(v).max(), 1e-12)) for k, v in ref.items())
    if not err <= BUILD_MAX_REL_ERROR:
        raise IntegrityError(
            f"{built.name}: the optimized graph disagrees with its source (relative error "
            f"{err:.2e}, limit {BUILD_MAX_REL_ERROR:.0e}); please report this as a bug"
        )
    return err


# Weight-only builds quantize activations per block at run time (accuracy level 4), so the fused
# attention's different float summation order moves a random-weight 30-layer LM's logits by ~1e-2;
# a structural error (heads, rotary, slots) moves them by O(1). fp32 builds keep the strict limit.
IN_PLACE_QUANTIZED_MAX_REL_ERROR = 5e-2
# The prefill build (`ort_prefill`) adds per-column int8 weights and per-tensor dynamic int8
# activations on top: 2.6e-2 on BLIP-2-base's random OPT-125M, 5.1e-2 on the 2-layer random Llama
# of the tests. Still an order of magnitude under a structural error.
PREFILL_MAX_REL_ERROR = 1e-1


def _check_decoder_build(
    source: Path,
    built: Path,
    entry: ComponentEntry,
    generation: dict[str, Any],
    threads: int,
    limit: float = BUILD_MAX_REL_ERROR,
) -> float:
    """`_check_build` for an LLM step rebuilt with an in-place cache (`ort_decoder`): the built step
    runs as the runtime runs it, present bound to the past buffers, on a cache with a few filled
    slots and garbage after them. Its logits and the entries it writes into the next slots must
    match the portable step's logits and new keys/values; every other slot must stay as it was."""
    from mmedge.builds.sessions import ort_session
    from mmedge.runtime.backends.base import SessionOptions
    from mmedge.runtime.backends.ort import OrtSession

    rng = np.random.default_rng(0)
    t, filled = int(generation["max_context"]), 3
    past = {
        s.name: rng.standard_normal((1, *s.shape[1:])).astype(np.float32)
        for s in entry.inputs
        if s.name.startswith("past_key_values.")
    }
    embed_dim = next(s.shape[2] for s in entry.inputs if s.name == "inputs_embeds")
    ref_sess, sess = ort_session(source, threads), OrtSession(str(built), SessionOptions(threads=threads))
    err = 0.0
    for new in (2, 1):  # a prompt after earlier turns, then one decoded token
        mask = np.zeros((1, t + new), np.int64)
        mask[:, :filled], mask[:, t:] = 1, 1
        feeds = {
            "inputs_embeds": rng.standard_normal((1, new, embed_dim)).astype(np.float32),
            "attention_mask": mask,
            "position_ids": np.arange(filled, filled + new, dtype=np.int64)[None],
            "logits_to_keep": np.array([new], np.int64),
        }
        ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, {**feeds, **past})))
        cache = {k: v.copy() for k, v in past.items()}
        logits = np.empty_like(ref["logits"])
        sess.run_into(
            {**feeds, **cache},
            {"logits": logits, **{k.replace("past_key_values.", "present."): v for k, v in cache.items()}},
        )
        pairs = [(logits, ref["logits"])]
        for name, buf in cache.items():
            pairs.append(
                (buf[:, :, filled : filled + new], ref[name.replace("past_key_values.", "present.")])
            )
            kept = np.concatenate([buf[:, :, :filled], buf[:, :, filled + new :]], axis=2)
            pairs.append(
                (kept, np.concatenate([past[name][:, :, :filled], past[name][:, :, filled + new :]], axis=2))
            )
        err = max(err, *(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)) for a, b in pairs))
    if not err <= limit:
        raise IntegrityError(
            f"{built.name}: the in-place cache build disagrees with its source (relative error "
            f"{err:.2e}, limit {limit:.0e}); please report this as a bug"
        )
    return err


def without_builds_of(tmp: Path, engines: dict[str, EngineEntry], keys: set[str]) -> dict[str, EngineEntry]:
    """The engine table without the builds of `keys` ("<component>.<precision>") and their variants
    ("llm.int4.prefill"), whose files are deleted: a build of the old weights must not outlive them."""
    variants = tuple(f"{k}." for k in keys)
    out = {}
    for target, engine in engines.items():
        kept = {}
        for key, rel in engine.files.items():
            if key in keys or key.startswith(variants):
                (tmp / rel).unlink(missing_ok=True)
            else:
                kept[key] = rel
        if kept:
            out[target] = replace(engine, files=kept)
    return out


def build_package(
    package: str | Path,
    backend: str = "ort",
    precision: str = "auto",
    threads: int = 2,
    progress: Callable[[str], None] | None = None,
    prefill: bool = True,
) -> dict[str, Any]:
    """Build every component at `precision` (auto = every precision present) for `backend`.

    For ORT, a weight-only LLM also gets a prefill build with int8 GEMMs (`ort_prefill`; `prefill`
    False skips it and its extra int8 copy of the weights)."""
    from mmedge.export.package_writer import write_manifest
    from mmedge.runtime.store import resolve

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

            from mmedge.builds.ort import optimize_for_ort
            from mmedge.runtime.backends.ort import ort_target

            target, version, device = ort_target("cpu"), ort.__version__, "CPUExecutionProvider"
            from mmedge.builds.ort import MATMULNBITS_ACCURACY_LEVEL
            from mmedge.builds.ort_prefill import write_prefill_build
            from mmedge.runtime.generation import PREFILL

            settings = {
                "level": "extended",
                "uint8_activations": "x86 only",
                "matmulnbits_accuracy_level": MATMULNBITS_ACCURACY_LEVEL,
                "kv_cache": "in-place where the LLM step matches (present.* = the whole cache)",
            }
            for name, entry in pkg.manifest.components.items():
                for p in _precisions(entry, precision):
                    rel = f"builds/{target}/{name}.{p}.onnx"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    src = tmp / entry.precisions[p].file
                    generation = pkg.manifest.generation if name == "llm" else None
                    ops = optimize_for_ort(src, tmp / rel, threads=threads, decoder=generation)
                    if ops.get("com.microsoft:GroupQueryAttention"):
                        limit = BUILD_MAX_REL_ERROR if p == "fp32" else IN_PLACE_QUANTIZED_MAX_REL_ERROR
                        err = _check_decoder_build(
                            src, tmp / rel, entry, pkg.manifest.generation, threads, limit
                        )
                    else:
                        err = _check_build(src, tmp / rel, pkg, entry, threads)
                    files[f"{name}.{p}"] = rel
                    report["builds"][f"{name}.{p}"] = {"file": rel, "ops": ops, "rel_error_vs_source": err}
                    say(f"built {name}.{p} for {target} (relative error vs source {err:.1e})")
                    if (
                        ops.get("com.microsoft:GroupQueryAttention")
                        and ops.get("com.microsoft:MatMulNBits")
                        and prefill
                    ):
                        key, prel = f"{name}.{p}.{PREFILL}", f"builds/{target}/{name}.{p}.{PREFILL}.onnx"
                        n = write_prefill_build(tmp / rel, tmp / prel)
                        err = _check_decoder_build(
                            src, tmp / prel, entry, pkg.manifest.generation, threads, PREFILL_MAX_REL_ERROR
                        )
                        files[key] = prel
                        report["builds"][key] = {"file": prel, "int8_gemms": n, "rel_error_vs_source": err}
                        say(
                            f"built {key} for {target}: {n} int8 GEMMs for prompts (relative error vs source {err:.1e})"
                        )
        else:
            from mmedge.builds import tensorrt as trt_backend

            records = {}
            for name, entry in pkg.manifest.components.items():
                for p in _precisions(entry, precision):
                    trt_precision = "int8" if p == "int8" else ("fp16" if p == "fp16" else "fp32")
                    rel = f"engines/pending/{name}.{p}.plan"
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    records[f"{name}.{p}"] = trt_backend.build_engine(
                        tmp / entry.precisions[p].file,
                        tmp / rel,
                        _profile(entry),
                        precision=trt_precision,
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
            # building some precisions keeps the target's other builds (their files stay in the package);
            # a rebuilt one drops its old variants ("llm.int4" drops "llm.int4.prefill" unless rebuilt too)
            rebuilt = tuple(f"{k}." for k in files)
            stale = {k for k in old.files if k.startswith(rebuilt) and k not in files}
            kept = without_builds_of(tmp, {target: old}, stale).get(target)
            files = {
                **{k: v for k, v in (kept.files if kept else {}).items() if (tmp / v).is_file()},
                **files,
            }
        engines = {**pkg.manifest.engines, target: EngineEntry(backend, version, device, settings, files)}
        write_manifest(tmp, replace(pkg.manifest, engines=engines))
        verify_package(tmp)
    report["target"] = target
    return report
