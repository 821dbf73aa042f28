"""The `mmedge` command line. It only parses arguments and calls the public API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mmedge.errors import MmedgeError
from mmedge.presets import list_presets
from mmedge.runtime.backends import BACKENDS, DEFAULT_BACKEND
from mmedge.runtime.manifest import AUTO_ORDER, REQUEST_PRECISIONS

DATA_HELP = (
    "shapes:N (N synthetic scenes from the fixed held-out seed), train-shapes:N (from the training "
    'seed), an image folder, or a JSONL file of {"image": path, "text": caption} lines'
)
PACKAGE_HELP = "package directory, or the name of a package in the model store ($MMEDGE_HOME)"


class _VerbParser(argparse.ArgumentParser):
    """A verb's parser: options and positionals may come in any order (`search PKG --add DIR "query"`)."""

    _intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._intermixing:  # parse_known_intermixed_args calls back into here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return super().parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An option value that is a comma-separated list: `--components vision,text`, `--weight-bits 4,8`."""

    def parse(value: str) -> list[Any]:
        try:
            return [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}") from None

    return parse


def _print(obj: object, as_json: bool, verb: str = "") -> None:
    from mmedge.sdk.tables import render

    print(json.dumps(obj, indent=2, sort_keys=True, default=str) if as_json else render(verb, obj))


# The package tasks each verb serves (a verb on another kind of package is refused by name).
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
    from mmedge.sdk.demo import run_demo

    return run_demo(steps=a.steps, eval_n=a.eval_n, threads=a.threads, json_out=a.json, blip2=not a.clip_only)


def build_parser() -> argparse.ArgumentParser:
    import mmedge

    p = argparse.ArgumentParser(
        prog="mmedge",
        description="Export, quantize and run multimodal models on edge devices. Every verb that takes a "
        "PACKAGE accepts a package directory or the name of a package in the model store ($MMEDGE_HOME); "
        "calibrate and build update the package in place (atomically).",
    )
    p.add_argument("--version", action="version", version=f"mmedge {mmedge.__version__}")
    verbose = _VerbParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_VerbParser)

    def add(
        name: str, fn: Callable[[argparse.Namespace], object], help_: str, json_flag: bool = True
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            parents=[verbose],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sp.set_defaults(fn=fn)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print machine-readable JSON (errors too)")
        return sp

    def runtime_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("package", help=PACKAGE_HELP)
        sp.add_argument("--backend", default=DEFAULT_BACKEND, choices=sorted(BACKENDS))
        sp.add_argument(
            "--precision",
            default="auto",
            choices=REQUEST_PRECISIONS,
            help="auto = the best precision each component has (" + " > ".join(AUTO_ORDER) + ")",
        )
        sp.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = backend default)")

    sp = add(
        "train",
        cmd_train,
        "train a preset (synthetic scenes by default, or --data) or fine-tune a model (--init); "
        "writes an mmedge checkpoint",
    )
    sp.add_argument("--preset", default="clip-tiny", help="one of: " + ", ".join(list_presets()))
    sp.add_argument("--out", required=True, help="checkpoint directory to write")
    sp.add_argument(
        "--force", action="store_true", help="replace --out even if it holds other files (they are deleted)"
    )
    sp.add_argument(
        "--data",
        default=None,
        help=DATA_HELP + "; for chat presets, a JSONL of LLaVA-style conversations "
        '({"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."}, '
        '{"from": "gpt", "value": "..."}]}). Default: synthetic scenes',
    )
    sp.add_argument(
        "--init",
        default=None,
        help="start from this mmedge checkpoint or HF directory (blip2 presets: a clip checkpoint trains "
        "the staged recipe on its vision tower, a blip2 one is fine-tuned on --data)",
    )
    sp.add_argument(
        "--steps", type=int, default=None, help="training steps (each stage's, for staged recipes)"
    )
    sp.add_argument("--batch-size", type=int, default=None)
    sp.add_argument("--lr", type=float, default=None)
    sp.add_argument(
        "--hard-negatives",
        type=int,
        default=None,
        help="clip on synthetic scenes: batch rows that edit one attribute of another row (default 32)",
    )
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=0)
    sp.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    sp.add_argument(
        "--fp32",
        action="store_true",
        help="no bf16 autocast (used by default only where the CPU has AMX tiles, ~1.3x faster steps)",
    )

    sp = add("families", cmd_families, "list the supported model families, their variants and HF model types")

    sp = add("init", cmd_init, "write a random-weight checkpoint of a preset (for benchmarks)")
    sp.add_argument("preset")
    sp.add_argument("--out", required=True)
    sp.add_argument("--force", action="store_true", help="replace --out even if it holds other files")
    sp.add_argument("--seed", type=int, default=0)

    sp = add("export", cmd_export, "export an mmedge checkpoint or HF model directory to a model package")
    sp.add_argument(
        "src", help="mmedge checkpoint directory or HF model directory (config.json + safetensors)"
    )
    sp.add_argument("--out", required=True, help="package directory to write (replaced atomically)")
    sp.add_argument(
        "--force", action="store_true", help="replace --out even if it holds other files (they are deleted)"
    )
    sp.add_argument("--family", default=None, help="override the family detected from the config")
    sp.add_argument("--name", default=None, help="package name (default: the directory name)")
    sp.add_argument("--opset", type=int, default=17)
    sp.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickle-based weights (.bin/.pt) with weights_only=True; off by default",
    )

    sp = add(
        "calibrate",
        cmd_calibrate,
        "quantize a package: encoders to INT8 Q/DQ against an accuracy target, "
        "an LLM to weight-only INT4/INT8; then build for the backend (the package is updated in place)",
    )
    sp.add_argument("package", help=PACKAGE_HELP)
    sp.add_argument(
        "--data",
        default="train-shapes:64",
        help=DATA_HELP + "; calibrate on data that evaluation does not use (train-shapes:N, not shapes:N)",
    )
    sp.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    sp.add_argument("--samples", type=int, default=64, help="calibration samples drawn from --data")
    sp.add_argument(
        "--target-cosine",
        type=float,
        default=0.99,
        help="minimum cosine of each output vs fp32; nodes are kept in float until it is met",
    )
    sp.add_argument(
        "--components",
        type=_csv(str),
        default=None,
        help="comma-separated components to quantize (default: all)",
    )
    sp.add_argument(
        "--weight-bits",
        type=_csv(int),
        default=[4],
        help="comma-separated weight-only precisions (4, 8) built for an LLM component",
    )
    sp.add_argument("--block-size", type=int, default=32, help="weights per quantization block along K (LLM)")
    sp.add_argument(
        "--build",
        default=DEFAULT_BACKEND,
        choices=sorted(BACKENDS),
        help="backend to build for once quantized (an unbuilt INT8 graph runs slower than fp32 on CPU)",
    )
    sp.add_argument("--no-build", action="store_true", help="quantize only; run `mmedge build` later")

    sp = add(
        "build",
        cmd_build,
        "build backend-specific graphs: ORT-optimized ONNX or TensorRT engines (the package is updated in place)",
    )
    sp.add_argument("package", help=PACKAGE_HELP)
    sp.add_argument("--backend", default=DEFAULT_BACKEND, choices=sorted(BACKENDS))
    sp.add_argument("--precision", default="auto", choices=REQUEST_PRECISIONS)
    sp.add_argument(
        "--no-prefill-build",
        action="store_true",
        help="ORT: skip the weight-only LLM's prefill build (int8 GEMMs for prompts, ~5x faster "
        "than the 4-bit kernel at 40 tokens; costs an int8 copy of the LLM weights)",
    )

    sp = add(
        "verify",
        cmd_verify,
        "verify a package: schema, wiring, sizes, sha256, paths, ONNX external data; "
        "with --trusted-keys (or MMEDGE_TRUST=signed), its signature too",
    )
    sp.add_argument("package", help=PACKAGE_HELP)
    sp.add_argument(
        "--trusted-keys",
        default=None,
        help="file of trusted Ed25519 public keys (PEM or base64 raw): the package must be signed by one "
        "(default: $MMEDGE_TRUSTED_KEYS when MMEDGE_TRUST=signed)",
    )
    sp = add(
        "sign",
        cmd_sign,
        "verify a package, then sign its manifest (Ed25519) into manifest.sig; "
        "calibrate and build remove the signature, so sign last",
    )
    sp.add_argument("package", help=PACKAGE_HELP)
    sp.add_argument(
        "--key",
        required=True,
        help="unencrypted PEM Ed25519 private key, readable by its owner only (mmedge keygen)",
    )
    sp = add("keygen", cmd_keygen, "write a new Ed25519 signing key pair: mmedge-signing.key (0600) and .pub")
    sp.add_argument("--out", required=True, help="folder for the key pair (created with mode 0700)")
    sp.add_argument("--force", action="store_true", help="replace a key pair already in --out")
    sp = add("inspect", cmd_inspect, "show a package's manifest: family, roles, paths, precisions, builds")
    sp.add_argument("package", help=PACKAGE_HELP)

    sp = add(
        "eval",
        cmd_eval,
        "task metrics on held-out data (retrieval: recall@1/@5 both ways; "
        "chat: VQA accuracy and caption exact-match)",
    )
    runtime_opts(sp)
    sp.add_argument(
        "--data",
        default=None,
        help=DATA_HELP
        + " (default: shapes:500 for retrieval, shapes:100 for chat packages, which need shapes:N)",
    )
    sp.add_argument("--limit", type=int, default=None, help="retrieval: evaluate on the first N items")
    sp.add_argument(
        "--questions", type=int, default=None, help="chat: colour/shape/count questions asked (300)"
    )
    sp.add_argument("--captions", type=int, default=None, help="chat: scenes captioned (100)")

    sp = add(
        "bench", cmd_bench, "per-component latency (p50/p90) and throughput; --vs torch compares to PyTorch"
    )
    runtime_opts(sp)
    sp.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    sp.add_argument("--runs", type=int, default=30)
    sp.add_argument(
        "--vs",
        choices=["torch"],
        default=None,
        help="also time PyTorch eager (and ORT fp32 when --precision is not fp32) on the same inputs",
    )
    sp.add_argument(
        "--components", type=_csv(str), default=None, help="comma-separated components to time (default: all)"
    )

    sp = add("embed", cmd_embed, "embed images or texts")
    runtime_opts(sp)
    sp.add_argument("images", nargs="*", help="image files")
    sp.add_argument(
        "--text", action="append", default=None, help="a text to embed instead of images (repeatable)"
    )
    sp.add_argument("--out", default=None, help="write embeddings to this .npy file")

    sp = add("search", cmd_search, "build or load an index and search it with a text or an image")
    runtime_opts(sp)
    sp.add_argument(
        "query", nargs="?", help="a text query (a string is always text; use --image for an image)"
    )
    sp.add_argument("--image", default=None, help="search with this image file instead of a text")
    sp.add_argument("--add", default=None, help=f"data to index first: {DATA_HELP}")
    sp.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip images that cannot be read (listed in the output) instead of stopping",
    )
    sp.add_argument("--index", default=None, help="index directory to load / save")
    sp.add_argument("-k", type=int, default=5)

    sp = add("classify", cmd_classify, "zero-shot classification of an image against labels")
    runtime_opts(sp)
    sp.add_argument("image")
    sp.add_argument("--labels", required=True, help="comma-separated labels")

    def gen_opts(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group("generation (names as in Hugging Face generate)")
        g.add_argument("--max-new-tokens", type=int, default=32)
        g.add_argument("--min-new-tokens", type=int, default=0)
        g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
        g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
        g.add_argument("--top-k", type=int, default=50)
        g.add_argument("--top-p", type=float, default=1.0)
        g.add_argument("--repetition-penalty", type=float, default=1.0)
        g.add_argument("--seed", type=int, default=None)
        g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")

    sp = add("caption", cmd_caption, "caption an image with a chat package (e.g. BLIP-2)")
    runtime_opts(sp)
    sp.add_argument("image", help="image file")
    gen_opts(sp)

    sp = add("chat", cmd_chat, "ask about an image; without a question, an interactive multi-turn chat")
    runtime_opts(sp)
    sp.add_argument("image", help="image file")
    sp.add_argument("question", nargs="?", default=None)
    gen_opts(sp)

    sp = add("generate", cmd_generate, "continue a text prompt with a causal-LM package (streamed)")
    runtime_opts(sp)
    sp.add_argument("prompt")
    gen_opts(sp)

    sp = add(
        "data", cmd_data, "write sample inputs: N synthetic scene images and a captions JSONL beside them"
    )
    sp.add_argument("kind", choices=["scenes"], help="what to write")
    sp.add_argument("count", type=int, help="how many images")
    sp.add_argument("--out", required=True, help="folder to write (created; existing files are kept)")
    sp.add_argument("--size", type=int, default=224, help="image side in pixels")
    sp.add_argument("--seed", type=int, default=None, help="scene seed (default: the held-out seed)")
    sp.add_argument(
        "--train", action="store_true", help="draw from the training seed instead of the held-out one"
    )

    add("list", cmd_list, "list the packages in the model store ($MMEDGE_HOME)")

    sp = add(
        "demo",
        cmd_demo,
        "the whole path: clip-tiny retrieval and blip2-tiny VQA/captions — train, export, "
        "quantize, build, evaluate, benchmark; prints tables (10-13 minutes on 2 idle cores without AMX)",
    )
    sp.add_argument(
        "--clip-only", action="store_true", help="stop after the clip-tiny part (about 6 minutes)"
    )
    sp.add_argument("--steps", type=int, default=None, help="training steps (default: preset's demo setting)")
    sp.add_argument("--eval-n", type=int, default=500)
    sp.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Exit codes: 0 done, 1 refused or failed (a typed error), 2 bad usage, 130 interrupted."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    as_json = getattr(args, "json", False)
    try:
        with warnings.catch_warnings():  # mmedge's warnings (e.g. a cut generation) read as notes
            warnings.showwarning = lambda message, *_args, **_kw: _note(str(message))
            out = args.fn(args)
        if out is not None:
            _print(out, as_json, args.cmd)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
    except MmedgeError as exc:
        if as_json:
            print(json.dumps({"error": str(exc), "type": type(exc).__name__, "command": args.cmd}))
        print(f"mmedge {args.cmd}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
