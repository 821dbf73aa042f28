"""What each `mmedge` verb does: one `cmd_*` function per verb, called with the parsed arguments
(`sdk.cli` declares the verbs and their options). Each calls the public API and returns what the
command line prints (a table, or JSON with --json)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mmedge.errors import MmedgeError

VERB_TASKS = {
    "embed": ("retrieval",),
    "search": ("retrieval",),
    "classify": ("retrieval", "classification"),
    "caption": ("chat",),
    "chat": ("chat",),
    "generate": ("generation",),
    "generate-image": ("image_generation",),
    "eval": ("retrieval", "chat", "classification", "image_generation"),
}


def _pipeline(args: argparse.Namespace) -> Any:  # the task's pipeline; each verb calls what it serves
    from mmedge import sdk
    from mmedge.errors import UnsupportedError

    p = sdk.Pipeline(args.package, backend=args.backend, precision=args.precision, threads=args.threads)
    m = p.runner.manifest
    wanted = VERB_TASKS.get(args.cmd)
    if wanted is not None and m.task not in wanted:
        verbs = sorted(v for v, tasks in VERB_TASKS.items() if m.task in tasks)
        raise UnsupportedError(
            f"{args.package} is a {m.task} package ({m.family}); `mmedge {args.cmd}` needs a "
            f"{' or '.join(wanted)} package. Verbs for {m.task} packages: {', '.join(verbs)}"
        )
    return p


def cmd_train(a: argparse.Namespace) -> object:
    from mmedge.recipes.base import TrainRequest, train_model

    request = TrainRequest(
        preset=a.preset,
        data=a.data,
        init=a.init,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        time_budget_s=a.time_budget,
        bf16=not a.fp32,
        hard_negatives=a.hard_negatives,
    )
    from mmedge.models.checkpoint import read_checkpoint_meta

    path = train_model(a.out, request, force=a.force)
    info = read_checkpoint_meta(path).get("train", {})
    summary = {k: info[k] for k in ("steps", "first_loss", "final_loss", "seconds") if k in info}
    for stage in ("lm", "stage1", "stage2"):  # a staged recipe reports each stage
        if stage in info:
            summary[stage] = info[stage]
    return {"checkpoint": str(path), **summary}


def cmd_families(a: argparse.Namespace) -> object:
    from mmedge.models.registry import families
    from mmedge.models.table import families_table

    if a.json:
        return {
            f.name: {
                "task": f.task,
                "variants": list(f.variants),
                "hf_model_types": list(f.hf.model_types if f.hf else ()),
            }
            for f in families().values()
        }
    print(families_table(), end="")
    return None


def cmd_init(a: argparse.Namespace) -> object:
    from mmedge.models.init import init_checkpoint

    return {"checkpoint": str(init_checkpoint(a.preset, a.out, seed=a.seed, force=a.force))}


def cmd_export(a: argparse.Namespace) -> object:
    from mmedge.export.exporter import export_model

    m = export_model(
        a.src,
        a.out,
        family=a.family,
        opset=a.opset,
        allow_pickle=a.allow_pickle,
        name=a.name,
        progress=print if not a.json else None,
        force=a.force,
        max_context=a.max_context,
        config=a.config,
        tokenizer=a.tokenizer,
    )
    return {"package": str(a.out), "components": sorted(m.components)}


def cmd_assemble(a: argparse.Namespace) -> object:
    from mmedge.errors import UnsupportedError
    from mmedge.export.exporter import check_target, export_loaded
    from mmedge.models.registry import Parts, families, get_family

    family = get_family(a.family)
    if family.assemble is None:
        able = sorted(f.name for f in families().values() if f.assemble is not None)
        raise UnsupportedError(f"family {a.family!r} is not assembled from parts; families that are: {able}")
    check_target(a.out, a.name, a.force)  # before reading gigabytes of weights
    parts = Parts(
        variant=a.variant,
        vision=Path(a.vision),
        llm=Path(a.llm),
        projection=Path(a.projection),
        allow_pickle=a.allow_pickle,
        max_context=a.max_context,
    )
    m = export_loaded(
        family.assemble(parts),
        a.out,
        opset=a.opset,
        name=a.name,
        progress=print if not a.json else None,
        force=a.force,
    )
    return {"package": str(a.out), "variant": m.variant, "components": sorted(m.components)}


def cmd_calibrate(a: argparse.Namespace) -> object:
    from mmedge.calibration.package import calibrate_package

    if a.fp16:
        from mmedge.calibration.fp16 import half_package

        return half_package(a.package, components=a.components, progress=print if not a.json else None)
    return calibrate_package(
        a.package,
        a.data,
        method=a.method,
        samples=a.samples,
        target_cosine=a.target_cosine,
        components=a.components,
        weight_bits=tuple(a.weight_bits),
        block_size=a.block_size,
        progress=print if not a.json else None,
        build=None if a.no_build else a.build,
    )


def _trt_settings(a: argparse.Namespace) -> dict[str, object]:
    """The TensorRT build settings the options ask for (defaults left out)."""
    settings: dict[str, object] = {}
    if a.version_compatible:
        settings["version_compatible"] = True
    if a.hardware_compatibility != "none":
        settings["hardware_compatibility"] = a.hardware_compatibility
    if a.workspace_mb is not None:
        settings["workspace_bytes"] = a.workspace_mb << 20
    return settings


def cmd_build(a: argparse.Namespace) -> object:
    from mmedge.builds.package import build_package

    if a.plan:
        from mmedge.errors import InvalidInputError

        if a.backend != "tensorrt":
            raise InvalidInputError("--plan describes TensorRT builds; add --backend tensorrt")
        from mmedge.builds.tensorrt import build_plan

        rows = build_plan(
            a.package,
            a.precision,
            settings=_trt_settings(a),
            versions=tuple(a.tensorrt_version or ("10.3.0", "11.1.0")),
            capability=a.compute_capability,
            gpu_name=a.gpu_name,
            platform=a.platform,
        )
        if not a.json:
            for r in rows:
                head = f"TensorRT {r['tensorrt']}  {r['component']}.{r['precision']}"
                if r["skip"]:
                    print(f"{head}: skipped: {r['skip']}")
                    continue
                print(
                    f"{head}: network flags {list(r['network_flags']) or 'none'}, builder flags "
                    f"{list(r['builder_flags']) or 'none'}, workspace {r['workspace_bytes']} B"
                )
                for name, (lo, opt, hi) in r["profile"].items():
                    print(f"    shape  {name}: min {lo} opt {opt} max {hi}")
                for name, (lo, opt, hi) in r["shape_values"].items():
                    print(f"    values {name}: min {lo} opt {opt} max {hi} (shape tensor, host memory)")
                print(
                    f"    host build {r['engine_dir']}/{r['component']}.{r['precision']}.plan; "
                    f"device cache key {r['cache_key']}"
                )
        return {"plans": rows} if a.json else None
    return build_package(
        a.package,
        backend=a.backend,
        precision=a.precision,
        prefill=not a.no_prefill_build,
        progress=print if not a.json else None,
        settings=_trt_settings(a),
    )


def cmd_verify(a: argparse.Namespace) -> object:
    from mmedge.runtime.package import verify_package
    from mmedge.runtime.signing import SIGNATURE_NAME, read_signature, trust_policy
    from mmedge.runtime.store import resolve

    policy = trust_policy(None, a.trusted_keys)
    pkg = verify_package(resolve(a.package), trust=policy)
    out: dict[str, object] = {"package": str(pkg.root), "ok": True, "files": len(pkg.manifest.files)}
    out["trust"] = policy.mode
    if policy.mode == "signed":
        sig = read_signature(pkg.root)
        out["signed_by"] = sig[0] if sig else None
    else:
        out["signature"] = (
            f"{SIGNATURE_NAME} present, not checked" if (pkg.root / SIGNATURE_NAME).exists() else "none"
        )
    return out


def cmd_sign(a: argparse.Namespace) -> object:
    from mmedge.runtime.signing import sign_package
    from mmedge.runtime.store import resolve

    return sign_package(resolve(a.package), a.key)


def cmd_keygen(a: argparse.Namespace) -> object:
    from mmedge.runtime.signing import generate_keypair

    return generate_keypair(a.out, force=a.force)


def cmd_inspect(a: argparse.Namespace) -> object:
    from mmedge.runtime.package import read_manifest
    from mmedge.runtime.store import resolve

    m = read_manifest(resolve(a.package))
    if a.json:
        return json.loads(m.to_json())
    return {
        "name": m.name,
        "family": m.family,
        "variant": m.variant,
        "task": m.task,
        "components": {c: f"{e.role}: {', '.join(sorted(e.precisions))}" for c, e in m.components.items()},
        "paths": {p: " -> ".join(s.component for s in path.steps) for p, path in m.pipeline.paths.items()},
        "engines": sorted(m.engines),
        "files": len(m.files),
        **(
            {
                "bundle": f"{m.bundle.target}, {m.bundle.precision}"
                + "".join(f", {k} {v}" for k, v in m.bundle.runtime.items())
            }
            if m.bundle is not None
            else {}
        ),
    }


def cmd_eval(a: argparse.Namespace) -> object:
    from mmedge.evaluation.tasks import evaluate, evaluate_chat

    p = _pipeline(a)
    if p.runner.manifest.task == "image_generation":
        from mmedge.evaluation.drawn_scenes import evaluate_generation

        if a.data is not None or a.rerank is not None:
            _note(
                "--data and --rerank do not apply to an image-generation package (held-out captions); ignored"
            )
        return evaluate_generation(p, n=200 if a.limit is None else a.limit)
    if p.runner.manifest.task == "classification":
        from mmedge.evaluation.tasks import evaluate_classification

        given = (
            ("--data", a.data),
            ("--rerank", a.rerank),
            ("--edits", None if a.edits == 1 else a.edits),
            ("--questions", a.questions),
            ("--captions", a.captions),
        )
        ignored = [flag for flag, value in given if value is not None]
        if ignored:
            _note(
                f"{', '.join(ignored)} do not apply to a classification package (held-out synthetic clouds, "
                "recordings and traces); ignored"
            )
        return evaluate_classification(p, n=600 if a.limit is None else a.limit)
    chat = p.runner.manifest.task == "chat"
    data = a.data or ("shapes:100" if chat else "shapes:500")
    ignored = ["--limit"] if chat and a.limit is not None else []
    ignored += ["--rerank"] if chat and a.rerank is not None else []
    ignored += ["--edits"] if chat and a.edits != 1 else []
    ignored += (
        []
        if chat
        else [f for f, v in (("--questions", a.questions), ("--captions", a.captions)) if v is not None]
    )
    if ignored:
        _note(f"{', '.join(ignored)} do not apply to a {p.runner.manifest.task} package; ignored")
    if data.startswith("train-shapes:"):
        _note(
            "train-shapes:N are training-seed scenes: the figures overstate held-out accuracy (use shapes:N)"
        )
    if chat:
        questions = 300 if a.questions is None else a.questions
        captions = 100 if a.captions is None else a.captions
        # a cross-attention package does one of the two: BLIP's VQA model answers, its captioner captions
        vqa = getattr(p, "answers_questions", None)
        if vqa is not None:
            skipped = ("--captions", a.captions) if vqa else ("--questions", a.questions)
            if skipped[1]:
                _note(f"{skipped[0]} does not apply to a {'VQA' if vqa else 'captioning'} package; ignored")
            questions, captions = (questions, 0) if vqa else (0, captions)
        return evaluate_chat(
            p, data, questions=questions, captions=captions, progress=None if a.json else print
        )
    result = evaluate(p, data, limit=a.limit)
    if a.rerank != 0 and getattr(p, "itm", None) is not None:
        from mmedge.evaluation.tasks import evaluate_rerank

        result["hard_negatives"] = evaluate_rerank(p, n=a.limit or 500, depth=a.rerank or 16, edits=a.edits)
    if len(getattr(p, "modalities", ())) > 2:  # ImageBind: audio, depth, ... into the same space
        from mmedge.evaluation.tasks import evaluate_modalities

        result["cross_modal"] = evaluate_modalities(p, n=a.limit or 500)
    return result


def _note(message: str) -> None:
    """A remark for the user that is not the command's output: stderr, so --json stays parseable."""
    print(f"mmedge: note: {message}", file=sys.stderr)


def _gen_kwargs(a: argparse.Namespace) -> dict[str, object]:
    kw: dict[str, object] = {
        "max_new_tokens": a.max_new_tokens,
        "min_new_tokens": a.min_new_tokens,
        "do_sample": a.do_sample,
        "temperature": a.temperature,
        "top_k": a.top_k,
        "top_p": a.top_p,
        "repetition_penalty": a.repetition_penalty,
        "seed": a.seed,
        "num_beams": a.num_beams,
        "length_penalty": a.length_penalty,
        "early_stopping": {"false": False, "true": True}.get(a.early_stopping, a.early_stopping),
    }
    if a.stop:
        kw["stop_strings"] = tuple(a.stop)
    return kw


def _stream(pieces: Iterable[str]) -> str:
    out = []
    for piece in pieces:
        print(piece, end="", flush=True)
        out.append(piece)
    print()
    return "".join(out)


def _rosbag_args(a: argparse.Namespace, inputs: bool) -> bool:
    """Whether this run reads a ROS bag; refuses options that only apply with (or without) one."""
    from mmedge.errors import InvalidInputError
    from mmedge.runtime.rosbag import check_thinning

    thinning = [
        f for f, v in (("--topic", a.topic), ("--every", a.every != 1), ("--max-rate", a.max_rate)) if v
    ]
    if a.rosbag is None:
        if thinning:
            raise InvalidInputError(f"{', '.join(thinning)} apply with --rosbag BAG only")
        if not inputs:
            raise InvalidInputError("give an image file, or --rosbag BAG --topic TOPIC")
        return False
    if inputs:
        raise InvalidInputError("give image files or --rosbag, not both")
    if not a.topic:
        raise InvalidInputError("--rosbag needs --topic TOPIC (a sensor_msgs/Image or CompressedImage topic)")
    check_thinning(a.every, a.max_rate)
    return True


def _over_rosbag(a: argparse.Namespace, p: Any, run: Callable[[Any], dict[str, object]]) -> object:
    """`run` on every kept frame of the bag's topic; one JSON line per frame, keyed by its timestamp,
    to --out (replaced only when the whole bag went through) or stdout."""
    import contextlib

    from mmedge.runtime.rosbag import bag_frames
    from mmedge.runtime.staging import open_atomic

    frames = bag_frames(a.rosbag, a.topic, every=a.every, max_rate=a.max_rate, limits=p.runner.image_limits)
    n = 0
    with open_atomic(a.out) if a.out else contextlib.nullcontext(sys.stdout.buffer) as f:
        for frame in frames:
            line = {
                "timestamp": frame.timestamp,
                "stamp": frame.stamp,
                "index": frame.index,
                **run(frame.rgb),
            }
            f.write(json.dumps(line).encode() + b"\n")
            f.flush()
            n += 1
    return {"rosbag": a.rosbag, "topic": a.topic, "frames": n, "out": a.out} if a.out else None


def cmd_caption(a: argparse.Namespace) -> object:
    bag = _rosbag_args(a, inputs=a.image is not None)
    p = _pipeline(a)
    if bag:
        return _over_rosbag(a, p, lambda rgb: {"caption": p.caption(rgb, **_gen_kwargs(a))})
    return {"image": a.image, "caption": p.caption(a.image, **_gen_kwargs(a))}


def cmd_chat(a: argparse.Namespace) -> object:
    from mmedge.errors import InvalidInputError

    if a.rosbag is not None:  # chat PKG --rosbag BAG --topic T QUESTION: the one positional is the question
        question = a.image if a.question is None else None
        if question is None:
            raise InvalidInputError(
                "with --rosbag, give one question (asked of every frame) and no image file"
            )
        _rosbag_args(a, inputs=False)
        p = _pipeline(a)
        gen = _gen_kwargs(a)
        return _over_rosbag(a, p, lambda rgb: {"question": question, "answer": p.chat(rgb, question, **gen)})
    _rosbag_args(a, inputs=a.image is not None)
    p = _pipeline(a)
    gen = _gen_kwargs(a)
    if a.question:
        if a.json:
            return {"image": a.image, "question": a.question, "answer": p.chat(a.image, a.question, **gen)}
        _stream(p.chat(a.image, a.question, stream=True, **gen))
        return None
    history: list[tuple[str, str]] = []
    p.image_prefix(a.image)  # a bad image fails here, once, before the prompt
    print(f"chatting about {a.image}; an empty line or Ctrl-D ends")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        print("model> ", end="", flush=True)
        while True:
            try:
                answer = _stream(p.chat(a.image, question, history=history, stream=True, **gen))
                break
            except MmedgeError as exc:
                if history and "context" in str(exc):  # the conversation outgrew the context
                    history.pop(0)
                    _note("dropped the oldest turn to fit the model's context")
                    continue
                print(f"\nerror: {exc}")
                answer = None
                break
        if answer is not None:
            history.append((question, answer))
    return None


def cmd_generate(a: argparse.Namespace) -> object:
    p = _pipeline(a)
    if a.json:
        return {"prompt": a.prompt, "text": p.generate(a.prompt, **_gen_kwargs(a))}
    _stream(p.generate(a.prompt, stream=True, **_gen_kwargs(a)))
    return None


def cmd_pack(a: argparse.Namespace) -> object:
    from mmedge.builds.bundle import pack_package

    return pack_package(
        a.package,
        a.out,
        target=a.target,
        precision=a.precision,
        portable=a.portable,
        force=a.force,
        progress=None if a.json else print,
        paths=a.paths,
    )


def cmd_bench(a: argparse.Namespace) -> object:
    from mmedge.sdk.bench import bench

    if a.load:
        from mmedge.runtime.store import resolve
        from mmedge.sdk.load_bench import bench_load

        return bench_load(
            resolve(a.package),
            precision=a.precision,
            threads=a.threads or 2,
            runs=a.runs or 5,
            backend=a.backend,
            preload=a.preload,
        )
    return bench(
        a.package,
        precision=a.precision,
        batches=[int(b) for b in a.batch.split(",")],
        runs=a.runs or 30,
        vs=a.vs,
        backend=a.backend,
        components=a.components,
    )


def _ray_args(a: argparse.Namespace, only_with_ray: tuple[str, ...]) -> bool:
    """Whether this run is on Ray; refuses the Ray options without --ray."""
    from mmedge.errors import InvalidInputError, require

    given = [f"--{o.replace('_', '-')}" for o in ("ray_address", *only_with_ray) if getattr(a, o) is not None]
    if not a.ray:
        if given:
            raise InvalidInputError(f"{', '.join(given)} apply with --ray only")
        return False
    require("ray", "ray")
    return True


def cmd_data(a: argparse.Namespace) -> object:
    from mmedge.data.export import write_scenes

    jsonl = write_scenes(a.count, a.out, image_size=a.size, seed=a.seed, held_out=not a.train)
    return {"images": a.count, "folder": str(Path(a.out)), "captions": str(jsonl)}


def cmd_list(a: argparse.Namespace) -> object:
    from mmedge.runtime.package import read_manifest
    from mmedge.runtime.store import list_packages, model_home

    rows = {}
    for name in list_packages():
        try:
            m = read_manifest(model_home() / name)
            rows[name] = f"{m.task} ({m.family}/{m.variant})"
        except MmedgeError as exc:
            rows[name] = f"unreadable: {exc}"
    return {"store": str(model_home()), "packages": rows}


def cmd_demo(a: argparse.Namespace) -> object:
    from mmedge.errors import InvalidInputError
    from mmedge.sdk.demo import run_demo, run_llava_demo
    from mmedge.sdk.demo_fusion import run_fusion_demo

    # The demo prints its own tables or JSON; returning its results would print the JSON twice.
    if a.family is not None and a.clip_only:
        raise InvalidInputError(
            f"--clip-only stops the default demo after clip-tiny; it does not apply to {a.family}"
        )
    if a.family == "llava":
        run_llava_demo(steps=a.steps, threads=a.threads, json_out=a.json, seed=a.seed)
    elif a.family == "fusion":
        run_fusion_demo(steps=a.steps, threads=a.threads, json_out=a.json, seed=a.seed)
    elif a.family == "generate":
        from mmedge.sdk.demo_generate import run_generate_demo

        run_generate_demo(steps=a.steps, threads=a.threads, json_out=a.json, seed=a.seed)
    elif a.family == "anymodal":
        from mmedge.sdk.demo_anymodal import run_anymodal_demo

        run_anymodal_demo(steps=a.steps, threads=a.threads, json_out=a.json, seed=a.seed)
    else:
        run_demo(
            steps=a.steps,
            eval_n=a.eval_n,
            threads=a.threads,
            json_out=a.json,
            blip2=not a.clip_only,
            seed=a.seed,
        )
    return None


def cmd_serve(a: argparse.Namespace) -> object:
    import os

    from mmedge.errors import require

    require("fastapi", "serve")
    require("uvicorn", "serve")
    require("prometheus_client", "serve")
    from mmedge.sdk.serve.config import TOKEN_ENV, ServeConfig
    from mmedge.sdk.serve.server import Server, open_pipelines

    config = ServeConfig(
        host=a.host,
        port=a.port,
        token=a.token if a.token is not None else os.environ.get(TOKEN_ENV) or None,
        allow_files=Path(a.allow_files) if a.allow_files else None,
        allow_hosts=tuple(a.allow_host or ()),
        workers=a.workers,
        max_queue=a.max_queue,
        batch_size=a.batch_size,
        batch_wait_ms=a.batch_wait_ms,
        max_body_bytes=a.max_body_bytes,
        max_tokens=a.max_tokens,
        request_timeout_s=a.request_timeout,
        fetch_timeout_s=a.fetch_timeout,
        shutdown_timeout_s=a.shutdown_timeout,
    )
    if _ray_args(a, ("replicas",)):
        from mmedge.sdk.serve.ray_deploy import serve_until_stopped

        replicas = 2 if a.replicas is None else a.replicas
        serve_until_stopped(a.packages, config, replicas, a.backend, a.precision, a.threads, a.ray_address)
        return None
    pipelines = open_pipelines(a.packages, a.backend, a.precision, a.threads)
    Server(pipelines, config, log_level=a.log_level).run()
    return None
