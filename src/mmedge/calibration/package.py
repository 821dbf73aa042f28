"""`mmedge calibrate`: INT8 Q/DQ builds of encoders and weight-only INT4/INT8 builds of an LLM,
written crash-safely.

Calibration data goes through exactly the runtime's preprocessing (image loading, resize, crop,
normalise; the package's tokenizer), so ranges are measured on what the device will see.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError, UnbuiltPrecisionWarning
from mmedge.runtime.backends import DEFAULT_BACKEND
from mmedge.runtime.manifest import ComponentEntry, Manifest, PrecisionEntry, fixed_text_length
from mmedge.runtime.package import Package, verify_package
from mmedge.runtime.sections import INSTRUCTION_SOURCES, role_paths, template_text
from mmedge.runtime.signing import drop_signature, unsigned_note
from mmedge.runtime.staging import staged_update, write_atomic

log = logging.getLogger(__name__)
FEED_BATCH = 8  # samples per calibration feed
EVAL_SAMPLES = 32  # extra samples, never used for ranges, that measure the cosine
CHAT_METRIC_SCENES, CHAT_METRIC_QUESTIONS = 20, 40  # a chat package's quick VQA check after calibration


def _sources(pkg: Package, path: str, items: list[Any]) -> dict[str, np.ndarray]:
    """The path's source arrays for data items, prepared exactly as the runtime prepares them
    (a further modality's items are its raw data: recordings, depth maps, IMU traces)."""
    from mmedge.data.modalities import SAMPLE_RATE
    from mmedge.runtime.components import package_tokenizer
    from mmedge.runtime.images import load_image, preprocess
    from mmedge.runtime.modality_inputs import MODALITY_PATHS, prepare_items

    m = pkg.manifest
    if path in MODALITY_PATHS:
        if m.modalities is None:
            raise InvalidInputError(f"package {m.name!r} declares no preprocessing for {path!r}")
        rate = SAMPLE_RATE if path == "audio" else None  # synthetic recordings are arrays at 16 kHz
        return prepare_items(m.modalities, path, items, sample_rate=rate, image=m.preprocess)[0]
    if path == "image":
        if m.preprocess is None:
            raise InvalidInputError(f"package {m.name!r} declares no image preprocessing")
        pixels = preprocess([load_image(it.image) for it in items], m.preprocess)
        if not m.reads_instruction():
            return {"pixel_values": pixels}
        # Each item's text as its instruction; an image without one gets the captioning prompt's.
        fallback = template_text(m.prompt.caption or "") if m.prompt else ""
        texts = [it.text or fallback for it in items]
        ids, mask = package_tokenizer(pkg, instruction=True).encode_batch(texts)
        return dict(zip(INSTRUCTION_SOURCES, (ids, mask)), pixel_values=pixels)
    tok = package_tokenizer(pkg)
    fixed = fixed_text_length(m)
    if fixed is not None:  # a graph of one text length (Stable Diffusion's): it reads no mask
        ids = tok.encode_padded([it.text for it in items], fixed)
        return {"input_ids": ids, "attention_mask": (ids != tok.pad_id).astype(np.int64)}
    ids, mask = tok.encode_batch([it.text for it in items])
    return {"input_ids": ids, "attention_mask": mask}


def _paths_of(pkg: Package, component: str) -> list[str]:
    """The declared paths that run `component` (a shared encoder runs on several)."""
    role = pkg.manifest.component(component).role
    paths = pkg.manifest.pipeline.paths
    return [
        p for p in role_paths(role) if p in paths and any(s.component == component for s in paths[p].steps)
    ]


def _feeds(
    pkg: Package, component: str, items: list[Any], path_name: str | None = None
) -> list[dict[str, np.ndarray]]:
    """Calibration feeds of a component on a path (default: the first that runs it): the data's
    sources run through the fp32 components before it on that path, batched by FEED_BATCH."""
    from mmedge.builds.sessions import ort_session

    paths = pkg.manifest.pipeline.paths
    path_name = path_name or next(iter(_paths_of(pkg, component)), None)
    if path_name is None:
        raise InvalidInputError(f"{component} is on no declared path; it cannot be calibrated from data")
    path = paths[path_name]
    sessions: dict[str, Any] = {}
    feeds = []
    for i in range(0, len(items), FEED_BATCH):
        values = _sources(pkg, path_name, items[i : i + FEED_BATCH])
        for step in path.steps:
            inputs = {g: values[v] for g, v in step.inputs.items()}
            if step.component == component:
                feeds.append(inputs)
                break
            if step.component not in sessions:
                sessions[step.component] = ort_session(
                    pkg.path(pkg.manifest.component(step.component).precisions["fp32"].file)
                )
            outs = dict(zip(step.outputs, sessions[step.component].run(list(step.outputs), inputs)))
            values.update({v: outs[g] for g, v in step.outputs.items()})
    return feeds


def _trajectories(
    pkg: Package, cal_items: list[Any], eval_items: list[Any], say: Callable[[str], None]
) -> tuple[dict[str, list[dict[str, np.ndarray]]], dict[str, list[dict[str, np.ndarray]]]]:
    """(calibration, held-out) inputs of an image-generation package's components, collected along
    the fp32 package's denoising trajectories for the data's captions (`calibration.denoising`)."""
    from mmedge.calibration.denoising import METRIC_IMAGES, trajectory_feeds

    cal = [it.text for it in cal_items if it.text][:METRIC_IMAGES]
    held = [it.text for it in eval_items if it.text][: max(1, METRIC_IMAGES // 2)]
    say(f"collecting denoising trajectories of {len(cal)} + {len(held)} captions")
    return trajectory_feeds(pkg, cal, seed=0), trajectory_feeds(pkg, held or cal, seed=1000)


def calibrate_package(
    package: str | Path,
    data: str,
    method: str = "minmax",
    samples: int = 64,
    target_cosine: float = 0.99,
    components: list[str] | None = None,
    weight_bits: tuple[int, ...] = (4,),
    block_size: int = 32,
    progress: Callable[[str], None] | None = None,
    build: str | None = DEFAULT_BACKEND,
    threads: int = 2,
) -> dict[str, Any]:
    """Quantize a package; returns the report.

    Encoders: INT8 Q/DQ until each output's cosine vs fp32 meets the target. Weight-only
    components (an LLM): block-wise INT4 and/or INT8 weights (`weight_bits`), each measured
    against fp32 (logits cosine, next-token agreement) on the data's texts. Then the package is
    built for `build` (default ORT: an unbuilt INT8 graph runs slower than fp32 on CPU); None
    leaves building to `mmedge build`.
    """
    from mmedge.builds.base import without_builds_of
    from mmedge.builds.package import build_package
    from mmedge.calibration.search import calibrate_to_target
    from mmedge.data import load_data
    from mmedge.data.sources import load_modality_data
    from mmedge.export.package_writer import write_manifest
    from mmedge.export.trt_lint import lint_model
    from mmedge.runtime.store import resolve

    say = progress or log.info
    if not 0.0 <= target_cosine <= 1.0:
        raise InvalidInputError(f"--target-cosine must be in [0, 1], got {target_cosine}")
    if samples < 1:
        raise InvalidInputError(f"--samples must be positive, got {samples}")
    pkg = verify_package(resolve(package))
    say(f"updating {pkg.root} in place (atomically)")
    size = pkg.manifest.preprocess.image_size if pkg.manifest.preprocess else 64
    items = load_data(data, image_size=size, limit=samples + EVAL_SAMPLES)
    # Samples past the first `samples` measure the cosine; with none left, the calibration set does.
    cal_items, eval_items = items[:samples], items[samples:] or items[:samples]
    wanted = components or list(pkg.manifest.components)
    report: dict[str, Any] = {
        "data": data,
        "method": method,
        "target_cosine": target_cosine,
        "components": {},
    }
    with staged_update(pkg.root) as tmp:
        unsigned = drop_signature(tmp)
        if unsigned:
            say(unsigned_note(pkg.root))
        comps = dict(pkg.manifest.components)
        trajectories = None  # (calibration, held-out) feeds per component, collected once
        for name in wanted:
            entry = pkg.manifest.component(name)
            kind = entry.calibration_data
            if kind == "none":  # e.g. an LLM: quantized weight-only, without activation calibration
                comps[name] = _weight_only(tmp, name, entry, weight_bits, block_size, report, say)
                continue
            if kind == "texts" and any(it.text is None for it in items):
                say(f"{name}: {data!r} has no texts; left in fp32")
                report["components"][name] = {"skipped": "no texts in the calibration data"}
                continue
            if kind == "denoising" and not any(it.text for it in cal_items):
                say(f"{name}: {data!r} has no captions to draw; left in fp32")
                report["components"][name] = {"skipped": "no captions in the calibration data"}
                continue
            if kind == "denoising":  # a U-Net (or VAE decoder): inputs along denoising trajectories
                if trajectories is None:
                    trajectories = _trajectories(pkg, cal_items, eval_items, say)
                cal_feeds, eval_feeds = trajectories[0].get(name, []), trajectories[1].get(name, [])
                eval_count = len(eval_feeds)  # denoising steps (or decoded images)
                what = f"{len(cal_feeds)} inputs along denoising trajectories"
            else:
                # (path, calibration items, held-out items) per path the calibration reads
                runs: list[tuple[str | None, list[Any], list[Any]]] = [(None, cal_items, eval_items)]
                if kind not in ("images", "texts"):  # further modalities (ImageBind's audio, depth, ...)
                    # "shared": Meta-Transformer's encoder, calibrated once on every path's tokens
                    modalities = _paths_of(pkg, name) if kind == "shared" else [kind]
                    share = max(1, samples // len(modalities))
                    runs = []
                    for modality in modalities:
                        raw = load_modality_data(
                            data, modality, size, share + EVAL_SAMPLES, task=pkg.manifest.task
                        )
                        if raw is not None:
                            runs.append(
                                (
                                    modality if kind == "shared" else None,
                                    raw[:share],
                                    raw[share:] or raw[:share],
                                )
                            )
                    if len(runs) < len(modalities):
                        say(
                            f"{name}: {data!r} has no {kind} data (synthetic scenes do: shapes:N); left in fp32"
                        )
                        report["components"][name] = {"skipped": f"no {kind} in the calibration data"}
                        continue
                cal_feeds = [f for path, c, _ in runs for f in _feeds(pkg, name, c, path)]
                eval_feeds = [f for path, _, h in runs for f in _feeds(pkg, name, h, path)]
                eval_count = sum(len(h) for _, _, h in runs)
                what = f"{sum(len(c) for _, c, _ in runs)} samples"
            if not cal_feeds:
                say(f"{name}: the calibration data gave it no inputs; left in fp32")
                report["components"][name] = {"skipped": "no calibration inputs"}
                continue
            say(f"calibrate {name} on {what} ({method}, target cosine {target_cosine})")
            fp32_rel = entry.precisions["fp32"].file
            int8_rel = fp32_rel.replace(".onnx", ".int8.onnx")
            res = calibrate_to_target(
                tmp / fp32_rel,
                tmp / int8_rel,
                cal_feeds,
                eval_feeds,
                method=method,
                target_cosine=target_cosine,
                progress=lambda m: say("  " + m),
            )
            record = {**res.to_dict(), "data": data}
            lint = lint_model(tmp / int8_rel)
            parity = {
                "cosine_vs_fp32": res.cosine,
                "trt_lint_ok": lint.ok,
                "eval_samples": eval_count,
            }
            comps[name] = replace(
                entry, precisions={**entry.precisions, "int8": PrecisionEntry(int8_rel, parity, record)}
            )
            report["components"][name] = {**record, "trt_lint_ok": lint.ok}
            cos = ", ".join(f"{k}={v:.4f}" for k, v in res.cosine.items())
            say(f"  {cos}; {len(res.float_nodes)} nodes kept in float; met={res.met}")
        requantized = {
            f"{name}.{p}"
            for name in wanted
            for p, rec in comps[name].precisions.items()
            if p != "fp32" and rec != pkg.manifest.components[name].precisions.get(p)
        }
        engines = without_builds_of(tmp, pkg.manifest.engines, requantized)
        manifest: Manifest = replace(pkg.manifest, components=comps, engines=engines)
        write_atomic(tmp / "reports" / "calibration.json", json.dumps(report, indent=2, sort_keys=True))
        manifest = write_manifest(tmp, manifest)
        staged = verify_package(tmp)
        manifest = _measure_weight_only(
            staged, manifest, [it.text for it in eval_items if it.text], report, say, target_cosine
        )
        write_manifest(tmp, manifest)
        staged = verify_package(tmp)
        report["task_metric"] = _task_metric(staged, eval_items, data)
        image = report["task_metric"].get("quantized_vs_fp32")
        if image is not None:  # an image-generation package: the final image's metric, on each int8 graph
            manifest = replace(
                manifest,
                components={
                    n: replace(
                        c,
                        precisions={
                            **c.precisions,
                            "int8": replace(
                                c.precisions["int8"],
                                parity={**c.precisions["int8"].parity, "image_vs_fp32": image},
                            ),
                        },
                    )
                    if c.calibration_data == "denoising" and "int8" in c.precisions
                    else c
                    for n, c in manifest.components.items()
                },
            )
            say(f"image vs fp32 (quantized graphs together): {image}")
        write_atomic(tmp / "reports" / "calibration.json", json.dumps(report, indent=2, sort_keys=True))
        write_manifest(tmp, manifest)
        verify_package(tmp)
    if unsigned:
        report["signature_removed"] = True
    if build is not None:
        say(f"building for {build}")
        report["build"] = build_package(pkg.root, backend=build, threads=threads, progress=say)
    elif requantized:
        say(
            f"note: the builds of {sorted(requantized)} were dropped with the old weights; run `mmedge build {pkg.root}`"
        )
    return report


def _weight_only(
    tmp: Path,
    name: str,
    entry: ComponentEntry,
    bits: tuple[int, ...],
    block_size: int,
    report: dict[str, Any],
    say: Callable[[str], None],
) -> ComponentEntry:
    """Add int4/int8 weight-only precisions of one component (none if it has no MatMul weights)."""
    from mmedge.calibration.weight_only import quantize_weight_only
    from mmedge.export.trt_lint import lint_model

    fp32_rel = entry.precisions["fp32"].file
    precisions = dict(entry.precisions)
    for b in bits:
        rel = fp32_rel.replace(".onnx", f".int{b}.onnx")
        count = quantize_weight_only(tmp / fp32_rel, tmp / rel, bits=b, block_size=block_size)
        if not count:
            (tmp / rel).unlink()
            report["components"][name] = {"skipped": "no MatMul weights to quantize"}
            return entry
        lint = lint_model(tmp / rel)
        record = {
            "method": "weight-only",
            "bits": b,
            "block_size": block_size,
            "symmetric": True,
            "matmuls": count,
        }
        precisions[f"int{b}"] = PrecisionEntry(rel, {"trt_lint_ok": lint.ok}, record)
        report["components"].setdefault(name, {})[f"int{b}"] = {**record, "trt_lint_ok": lint.ok}
        say(f"{name}: weight-only int{b}, {count} MatMul weights in blocks of {block_size}")
    return replace(entry, precisions=precisions)


def _measure_weight_only(
    pkg: Package,
    manifest: Manifest,
    texts: list[str],
    report: dict[str, Any],
    say: Callable[[str], None],
    target_cosine: float = 0.0,
) -> Manifest:
    """Logits cosine and next-token agreement of each weight-only LLM precision against fp32."""
    from mmedge.runtime.components import ComponentRunner
    from mmedge.runtime.generation import LanguageModel
    from mmedge.runtime.metrics import row_cosine

    name = next((n for n, c in manifest.components.items() if c.role == "llm_step"), None)
    llm = manifest.components.get(name) if name else None
    weight_only = [
        p for p, e in (llm.precisions.items() if llm else ()) if e.calibration.get("method") == "weight-only"
    ]
    if not weight_only:
        return manifest
    if not texts:
        raise InvalidInputError("weight-only accuracy is measured on texts; the --data given has none")

    def logits(precision: str) -> np.ndarray:
        with warnings.catch_warnings():  # the staged package is built after calibration
            warnings.simplefilter("ignore", UnbuiltPrecisionWarning)
            lm = LanguageModel(ComponentRunner(pkg, precision=precision))
            cross = _sample_cross(lm)  # loads the cross_kv component, unbuilt too
        rows = []
        for text in texts[:EVAL_SAMPLES]:
            ids = lm.tokenizer.encode(text)[: lm.max_context]
            cache = lm.new_cache()
            cache.cross = cross
            rows.append(lm.forward(lm.embed(np.array([ids])), cache)[0])
        return np.concatenate(rows)  # (tokens, V)

    ref = logits("fp32")
    precisions = dict(llm.precisions)
    for p in weight_only:
        out = logits(p)
        cosine = row_cosine(ref, out)
        acc = {
            "logits_cosine": round(cosine, 6),
            "top1_agreement": round(float((ref.argmax(1) == out.argmax(1)).mean()), 4),
            "eval_tokens": len(ref),
            "met": cosine >= target_cosine,
        }
        precisions[p] = replace(precisions[p], parity={**precisions[p].parity, **acc})
        report["components"].setdefault(name, {}).setdefault(p, {}).update(
            acc
        )  # measured even if not requantized now
        say(
            f"{name} {p}: logits cosine {acc['logits_cosine']:.4f}, next-token agreement {acc['top1_agreement']:.3f} "
            f"on {acc['eval_tokens']} tokens"
        )
        if not acc["met"]:
            say(
                f"warning: {name} {p} logits cosine {cosine:.4f} is below the target {target_cosine}; "
                "weight-only quantization keeps no layer in float: try --weight-bits 8 or --block-size 16"
            )
    return replace(manifest, components={**manifest.components, name: replace(llm, precisions=precisions)})


def _sample_cross(lm: Any) -> dict[str, np.ndarray]:
    """A cross-attention decoder's keys/values for measuring its LLM on texts alone: the cross_kv
    component (at the precision under test) over seeded random states; {} for other decoders."""
    from mmedge.runtime.feeds import sample_feeds

    if not lm.cross_names:
        return {}
    runner = lm.runner
    name = runner.manifest.by_role("cross_kv")
    entry = runner.manifest.component(name)
    feeds = sample_feeds(entry.inputs, entry.dims, seed=0)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in runner.run_batched(name, feeds).items()}


def _task_metric(pkg: Package, items: list[Any], data: str) -> dict[str, Any]:
    """The task metric, fp32 against quantized: retrieval recall on the held-back captioned samples,
    for a chat package VQA accuracy on synthetic scenes (which carry questions), for an image-generation
    package the PSNR of its images against fp32 ones (`calibration.denoising.image_metric`)."""
    from mmedge.evaluation.tasks import evaluate_chat, evaluate_items
    from mmedge.runtime.components import ComponentRunner
    from mmedge.runtime.pipelines import open_pipeline

    task = pkg.manifest.task
    if task == "retrieval" and any(it.text is None for it in items):
        return {"skipped": "retrieval recall needs a caption per image; the data has images without text"}
    if task == "chat" and not data.startswith(("shapes:", "train-shapes:")):
        return {
            "skipped": "chat metrics (VQA) need synthetic scenes with questions: --data shapes:N or train-shapes:N"
        }
    if task == "image_generation":
        from mmedge.calibration.denoising import image_metric

        prompts = [it.text for it in items if it.text]
        if not prompts:
            return {"skipped": "the image-level metric draws the data's captions; the data has none"}
        return {"quantized_vs_fp32": image_metric(pkg, prompts, "auto")}
    if task not in ("retrieval", "chat"):
        return {"skipped": f"no task metric for {task} packages; see the weight-only logits records"}
    out = {}
    # "auto" takes the quantized precisions where calibration made them. The staged package is not
    # built yet: its quantized graphs run unbuilt here, which is expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnbuiltPrecisionWarning)
        for label, precision in (("fp32", "fp32"), ("quantized", "auto")):
            pipe = open_pipeline(ComponentRunner(pkg, precision=precision))
            if task == "retrieval":
                out[label] = evaluate_items(pipe, items)
            else:
                spec = f"{data.split(':', 1)[0]}:{CHAT_METRIC_SCENES}"
                out[label] = evaluate_chat(pipe, spec, questions=CHAT_METRIC_QUESTIONS, captions=0)
    return out
