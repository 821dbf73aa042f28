"""The `mmedge` command line. It only parses arguments and calls the public API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mmedge.errors import MmedgeError
from mmedge.presets import list_presets
from mmedge.runtime.backends import BACKENDS, DEFAULT_BACKEND
from mmedge.runtime.manifest import AUTO_ORDER, REQUEST_PRECISIONS

DATA_HELP = (
    "shapes:N (N synthetic scenes from the fixed held-out seed), an image folder, "
    'or a JSONL file of {"image": path, "text": caption} lines'
)


def _print(obj: object, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=True, default=str))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            print(f"{k}: {json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else v}")
    else:
        print(obj)


def _pipeline(args: argparse.Namespace) -> Any:  # the task's pipeline; each verb calls what it serves
    from mmedge import sdk

    return sdk.Pipeline(args.package, backend=args.backend, precision=args.precision, threads=args.threads)


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
    return {"checkpoint": str(train_model(a.out, request))}


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

    return {"checkpoint": str(init_checkpoint(a.preset, a.out, seed=a.seed))}


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

    pkg = verify_package(a.package)
    return {"package": str(pkg.root), "ok": True, "files": len(pkg.manifest.files)}


def cmd_inspect(a: argparse.Namespace) -> object:
    from mmedge.runtime.package import read_manifest

    m = read_manifest(a.package)
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
    if p.runner.manifest.task == "chat":
        return evaluate_chat(
            p,
            a.data if a.data != "shapes:500" else "shapes:100",
            questions=a.questions,
            captions=a.captions,
            progress=None if a.json else print,
        )
    return evaluate(p, a.data, limit=a.limit)


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
        try:
            answer = _stream(p.chat(a.image, question, history=history, stream=True, **gen))
        except MmedgeError as exc:  # e.g. the conversation outgrew the context: say so and go on
            print(f"\nerror: {exc}")
            continue
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

    p = _pipeline(a)
    emb = p.embed_texts(a.text) if a.text else p.embed_images(a.images)
    if a.out:
        np.save(a.out, emb)
        return {"shape": list(emb.shape), "out": a.out}
    return {"embeddings": emb.tolist()} if a.json else {"shape": list(emb.shape)}


def cmd_search(a: argparse.Namespace) -> object:
    from mmedge.runtime.index import VectorIndex

    p = _pipeline(a)
    if a.index and Path(a.index).exists():
        p.index = VectorIndex.load(a.index)
    if a.add:
        from mmedge.data import load_data

        items = load_data(a.add)
        p.add_images(
            [it.image for it in items],
            labels=[str(it.image) if isinstance(it.image, str) else (it.text or "") for it in items],
        )
        if a.index:
            p.index.save(a.index)
    if not a.query:
        return {"indexed": len(p.index)}
    hits = p.search(_query(a.query), k=a.k)
    return {
        "query": a.query,
        "hits": [{"id": h.id, "score": round(h.score, 4), "label": h.label} for h in hits],
    }


def _query(q: str) -> object:
    """A query naming an existing file is an image; anything else is text."""
    return Path(q) if Path(q).is_file() else q


def cmd_classify(a: argparse.Namespace) -> object:
    p = _pipeline(a)
    labels = [s.strip() for s in a.labels.split(",") if s.strip()]
    return {
        "image": a.image,
        "labels": [{"label": r.label, "score": round(r.score, 4)} for r in p.classify(a.image, labels)],
    }


def cmd_demo(a: argparse.Namespace) -> object:
    from mmedge.sdk.demo import run_demo

    return run_demo(steps=a.steps, eval_n=a.eval_n, threads=a.threads, json_out=a.json, blip2=not a.clip_only)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmedge", description="Export, quantize and run multimodal models on edge devices."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace], object], help_: str, json_flag: bool = True
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print machine-readable JSON")
        return sp

    def runtime_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("package", help="package directory or name in the model store ($MMEDGE_HOME)")
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
    sp.add_argument("--seed", type=int, default=0)

    sp = add("export", cmd_export, "export an mmedge checkpoint or HF model directory to a model package")
    sp.add_argument(
        "src", help="mmedge checkpoint directory or HF model directory (config.json + safetensors)"
    )
    sp.add_argument("--out", required=True, help="package directory to write (replaced atomically)")
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
        "an LLM to weight-only INT4/INT8",
    )
    sp.add_argument("package")
    sp.add_argument("--data", default="shapes:64", help=DATA_HELP)
    sp.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    sp.add_argument("--samples", type=int, default=64, help="calibration samples drawn from --data")
    sp.add_argument(
        "--target-cosine",
        type=float,
        default=0.99,
        help="minimum cosine of each output vs fp32; nodes are kept in float until it is met",
    )
    sp.add_argument("--components", nargs="*", default=None, help="components to quantize (default: all)")
    sp.add_argument(
        "--weight-bits",
        type=int,
        nargs="+",
        default=[4],
        choices=[4, 8],
        help="weight-only precisions built for an LLM component (default: 4)",
    )
    sp.add_argument("--block-size", type=int, default=32, help="weights per quantization block along K (LLM)")
    sp.add_argument(
        "--build",
        default=DEFAULT_BACKEND,
        choices=sorted(BACKENDS),
        help="backend to build for once quantized (an unbuilt INT8 graph runs slower than fp32 on CPU)",
    )
    sp.add_argument("--no-build", action="store_true", help="quantize only; run `mmedge build` later")

    sp = add("build", cmd_build, "build backend-specific graphs: ORT-optimized ONNX or TensorRT engines")
    sp.add_argument("package")
    sp.add_argument("--backend", default=DEFAULT_BACKEND, choices=sorted(BACKENDS))
    sp.add_argument("--precision", default="auto", choices=REQUEST_PRECISIONS)
    sp.add_argument(
        "--no-prefill-build",
        action="store_true",
        help="ORT: skip the weight-only LLM's prefill build (int8 GEMMs for prompts, ~5x faster "
        "than the 4-bit kernel at 40 tokens; costs an int8 copy of the LLM weights)",
    )

    sp = add("verify", cmd_verify, "verify a package: schema, sizes, sha256, paths, ONNX external data")
    sp.add_argument("package")
    sp = add("inspect", cmd_inspect, "show a package's manifest")
    sp.add_argument("package")

    sp = add(
        "eval",
        cmd_eval,
        "task metrics on held-out data (retrieval: recall@1/@5 both ways; "
        "chat: VQA accuracy and caption exact-match)",
    )
    runtime_opts(sp)
    sp.add_argument(
        "--data", default="shapes:500", help=DATA_HELP + " (chat packages: shapes:N, default shapes:100)"
    )
    sp.add_argument("--limit", type=int, default=None)
    sp.add_argument("--questions", type=int, default=300, help="chat: colour/shape/count questions asked")
    sp.add_argument("--captions", type=int, default=100, help="chat: scenes captioned")

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
    sp.add_argument("--components", nargs="*", default=None, help="components to time (default: all)")

    sp = add("embed", cmd_embed, "embed images or texts")
    runtime_opts(sp)
    sp.add_argument("images", nargs="*", help="image files")
    sp.add_argument("--text", nargs="*", help="texts to embed instead of images")
    sp.add_argument("--out", default=None, help="write embeddings to this .npy file")

    sp = add("search", cmd_search, "build or load an index and search it with a text or an image")
    runtime_opts(sp)
    sp.add_argument("query", nargs="?", help="text, or a path to an image file")
    sp.add_argument("--add", default=None, help=f"data to index first: {DATA_HELP}")
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
        g.add_argument("--stop", nargs="*", default=None, help="stop strings")

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
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        out = args.fn(args)
    except MmedgeError as exc:
        print(f"mmedge {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if out is not None:
        _print(out, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
