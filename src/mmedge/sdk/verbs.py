"""What each `mmedge` verb does: one `cmd_*` function per verb, called with the parsed arguments
(`sdk.cli` declares the verbs and their options). Each calls the public API and returns what the
command line prints (a table, or JSON with --json)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmedge.errors import MmedgeError

VERB_TASKS = {
    "embed": ("retrieval",),
    "search": ("retrieval",),
    "classify": ("retrieval",),
    "caption": ("chat",),
    "chat": ("chat",),
    "generate": ("generation",),
    "eval": ("retrieval", "chat"),
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
        threads=a.threads,
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
    )
    return {"package": str(a.out), "components": sorted(m.components)}


def cmd_calibrate(a: argparse.Namespace) -> object:
    from mmedge.calibration.package import calibrate_package

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


def cmd_build(a: argparse.Namespace) -> object:
    from mmedge.builds.package import build_package

    return build_package(
        a.package,
        backend=a.backend,
        precision=a.precision,
        prefill=not a.no_prefill_build,
        progress=print if not a.json else None,
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
    }


def cmd_eval(a: argparse.Namespace) -> object:
    from mmedge.evaluation.tasks import evaluate, evaluate_chat

    p = _pipeline(a)
    chat = p.runner.manifest.task == "chat"
    data = a.data or ("shapes:100" if chat else "shapes:500")
    ignored = ["--limit"] if chat and a.limit is not None else []
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
        return evaluate_chat(
            p,
            data,
            questions=300 if a.questions is None else a.questions,
            captions=100 if a.captions is None else a.captions,
            progress=None if a.json else print,
        )
    return evaluate(p, data, limit=a.limit)


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


def cmd_caption(a: argparse.Namespace) -> object:
    p = _pipeline(a)
    return {"image": a.image, "caption": p.caption(a.image, **_gen_kwargs(a))}


def cmd_chat(a: argparse.Namespace) -> object:
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


def cmd_bench(a: argparse.Namespace) -> object:
    from mmedge.sdk.bench import bench

    return bench(
        a.package,
        precision=a.precision,
        batches=[int(b) for b in a.batch.split(",")],
        threads=a.threads,
        runs=a.runs,
        vs=a.vs,
        backend=a.backend,
        components=a.components,
    )


def cmd_embed(a: argparse.Namespace) -> object:
    import numpy as np

    from mmedge.errors import InvalidInputError

    if bool(a.text) == bool(a.images):
        raise InvalidInputError("give image files or --text (repeatable), not both and not neither")
    p = _pipeline(a)
    emb = p.embed_texts(a.text) if a.text else p.embed_images(a.images)
    if a.out:
        Path(a.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        np.save(a.out, emb)
        return {"shape": list(emb.shape), "out": a.out}
    return {"embeddings": emb.tolist()} if a.json else {"shape": list(emb.shape)}


def cmd_search(a: argparse.Namespace) -> object:
    from mmedge.errors import InvalidInputError
    from mmedge.runtime.index import VectorIndex

    if a.query is not None and a.image is not None:
        raise InvalidInputError("give a text query or --image, not both")
    p = _pipeline(a)
    if a.index and Path(a.index).exists():
        p.index = VectorIndex.load(a.index)
    elif a.index and not a.add:
        raise InvalidInputError(
            f"index {a.index!r} does not exist; build it with --add DATA --index {a.index}"
        )
    out: dict[str, object] = {}
    if a.add:
        from mmedge.data import load_data

        items = load_data(a.add)
        if a.skip_bad:
            items, bad = _readable(items)
            out["skipped_unreadable"] = bad
        have = p.index.label_ids()
        labels = [str(it.image) if isinstance(it.image, str) else (it.text or "") for it in items]
        new = [(it, lab) for it, lab in zip(items, labels) if not (isinstance(it.image, str) and lab in have)]
        if new:
            p.add_images([it.image for it, _ in new], labels=[lab for _, lab in new])
        out.update(added=len(new), already_indexed=len(items) - len(new))
        if a.index:
            p.index.save(a.index)
    if a.query is None and a.image is None:
        return {**out, "indexed": len(p.index)}
    hits = p.search(a.image if a.image is not None else a.query, k=a.k, image=a.image is not None)
    return {
        **out,
        "query": a.query if a.image is None else a.image,
        "hits": [{"id": h.id, "score": round(h.score, 4), "label": h.label} for h in hits],
    }


def _readable(items: list[Any]) -> tuple[list[Any], list[str]]:
    """The items whose image loads, and `path: reason` of those that do not."""
    from mmedge.runtime.images import load_image

    good, bad = [], []
    for it in items:
        try:
            load_image(it.image)
            good.append(it)
        except MmedgeError as exc:
            bad.append(f"{it.image}: {exc}")
    for line in bad:
        _note(f"skipped {line}")
    return good, bad


def cmd_classify(a: argparse.Namespace) -> object:
    p = _pipeline(a)
    labels = [s.strip() for s in a.labels.split(",") if s.strip()]
    return {
        "image": a.image,
        "labels": [{"label": r.label, "score": round(r.score, 4)} for r in p.classify(a.image, labels)],
    }


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

    # The demo prints its own tables or JSON; returning its results would print the JSON twice.
    if a.family == "llava":
        if a.clip_only:
            raise InvalidInputError(
                "--clip-only stops the default demo after clip-tiny; it does not apply to llava"
            )
        run_llava_demo(steps=a.steps, threads=a.threads, json_out=a.json, seed=a.seed)
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
