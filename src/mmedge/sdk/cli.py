"""The `mmedge` command line. It only parses arguments and calls the public API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

from mmedge.errors import MmedgeError
from mmedge.presets import list_presets
from mmedge.runtime.backends import BACKENDS, DEFAULT_BACKEND
from mmedge.runtime.manifest import AUTO_ORDER, REQUEST_PRECISIONS
from mmedge.runtime.sections import BUNDLE_TARGETS
from mmedge.runtime.trt_plan import HARDWARE_LEVELS
from mmedge.sdk import verbs, verbs_image, verbs_retrieval
from mmedge.sdk.cli_serve import serve_arguments

DATA_HELP = (
    "shapes:N (N synthetic scenes from the fixed held-out seed), train-shapes:N (from the training "
    'seed), an image folder, or a JSONL file of {"image": path, "text": caption} lines'
)
DEMO_FAMILIES = ("llava", "fusion", "anymodal", "generate")  # `mmedge demo FAMILY`: one family's part alone
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


EMBED_MODALITIES = ("image", "text", "audio", "depth", "thermal", "imu", "video")
CLASSIFY_MODALITIES = ("image", "points", "audio", "imu")
MODALITY_HELP = (
    "what the inputs are, where the package embeds it (ImageBind): audio files (WAV/FLAC/OGG), depth "
    "(disparity) and thermal maps as 16-bit PNG or .npy, IMU traces as (6, T) .npy, video clips as "
    "(T, H, W, 3) uint8 .npy of decoded frames (docs/modalities.md)"
)


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
        verbs.cmd_train,
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
        "the staged recipe on its vision tower, a blip2 one is fine-tuned on --data; albef and blip "
        "presets: a clip checkpoint starts the ViT, required for blip)",
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
        help="clip, albef, blip on synthetic scenes: batch rows that edit one attribute of another row "
        "(default: clip 32, albef and blip 8)",
    )
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=0)
    sp.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    sp.add_argument(
        "--fp32",
        action="store_true",
        help="no bf16 autocast (used by default only where the CPU has AMX tiles, ~1.3x faster steps)",
    )

    sp = add(
        "families", verbs.cmd_families, "list the supported model families, their variants and HF model types"
    )

    sp = add("init", verbs.cmd_init, "write a random-weight checkpoint of a preset (for benchmarks)")
    sp.add_argument("preset")
    sp.add_argument("--out", required=True)
    sp.add_argument("--force", action="store_true", help="replace --out even if it holds other files")
    sp.add_argument("--seed", type=int, default=0)

    sp = add(
        "export", verbs.cmd_export, "export an mmedge checkpoint or HF model directory to a model package"
    )
    sp.add_argument(
        "src",
        help="mmedge checkpoint directory, HF model directory (config.json + safetensors), or a weights "
        "file in a family's official layout (albef: ALBEF.pth; needs --family)",
    )
    sp.add_argument("--out", required=True, help="package directory to write (replaced atomically)")
    sp.add_argument(
        "--force", action="store_true", help="replace --out even if it holds other files (they are deleted)"
    )
    sp.add_argument("--family", default=None, help="override the family detected from the config")
    sp.add_argument("--name", default=None, help="package name (default: the directory name)")
    sp.add_argument("--opset", type=int, default=17)
    sp.add_argument(
        "--max-context",
        type=int,
        default=None,
        metavar="N",
        help="KV cache slots of an LM imported from an HF directory: the longest conversation, image tokens "
        "included (default 256; llava: one image's tokens + 1024; capped by max_position_embeddings)",
    )
    sp.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickle-based weights (.bin/.pt) with weights_only=True; off by default",
    )
    sp.add_argument(
        "--config",
        default=None,
        help="official weights file: the family's config as JSON (default: the released model's sizes)",
    )
    sp.add_argument(
        "--tokenizer",
        default=None,
        help="official weights file: its tokenizer.json (default: tokenizer.json beside the file)",
    )

    sp = add(
        "assemble",
        verbs.cmd_assemble,
        "export a model released as separate parts into a model package: minigpt4 = BLIP-2's image "
        "encoder (vicuna variant: and Q-Former) from --vision, a Llama-family LM from --llm, and the "
        "trained Linear between them (llama_proj) from --projection",
    )
    sp.add_argument("family", help="the family of the model (one that assembles from parts: minigpt4)")
    sp.add_argument(
        "--variant",
        required=True,
        help="minigpt4: vicuna (MiniGPT-4 v1: ViT -> Q-Former -> Linear -> Vicuna) or llama2 (ViT patch "
        "tokens, four merged into one -> Linear -> Llama-2 chat)",
    )
    sp.add_argument(
        "--vision",
        required=True,
        help="HF BLIP-2 directory (Blip2ForConditionalGeneration / Blip2Model save_pretrained) with its image "
        "processor; only its vision model (and Q-Former) are read",
    )
    sp.add_argument(
        "--llm", required=True, help="HF Llama directory (config.json, safetensors, tokenizer.json)"
    )
    sp.add_argument(
        "--projection",
        required=True,
        help="the released projection weights (llama_proj.weight/bias, at the top level or under 'model'): "
        ".safetensors, or .pth/.pt with --allow-pickle",
    )
    sp.add_argument("--out", required=True, help="package directory to write (replaced atomically)")
    sp.add_argument(
        "--force", action="store_true", help="replace --out even if it holds other files (they are deleted)"
    )
    sp.add_argument("--name", default=None, help="package name (default: the directory name)")
    sp.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="KV cache slots of the package; unset: 256, capped at the LM's max_position_embeddings",
    )
    sp.add_argument("--opset", type=int, default=17)
    sp.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickle-based weights (.pth/.pt/.bin) with weights_only=True; off by default",
    )

    sp = add(
        "calibrate",
        verbs.cmd_calibrate,
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
    sp.add_argument(
        "--fp16",
        action="store_true",
        help="instead of quantizing: add an fp16 graph of each component (--components), for GPU targets "
        "(TensorRT's strongly typed FP16, ORT's CUDA/TensorRT providers), its error vs fp32 recorded; "
        "the CPU keeps running fp32/int8",
    )

    sp = add(
        "build",
        verbs.cmd_build,
        "build backend-specific graphs: ORT-optimized ONNX or TensorRT engines (the package is updated in place)",
    )
    sp.add_argument("package", help=PACKAGE_HELP)
    sp.add_argument("--backend", default=DEFAULT_BACKEND, choices=sorted(BACKENDS))
    sp.add_argument("--precision", default="auto", choices=REQUEST_PRECISIONS)
    sp.add_argument(
        "--no-prefill-build",
        action="store_true",
        help="ORT: skip the weight-only LLM's prefill build (int8 GEMMs for prompts, ~5x faster "
        "than the 4-bit kernel at 40 tokens; costs an int8 copy of the LLM weights), and keep a "
        "weight-only cross_kv on the weight-only kernel instead of int8 GEMMs",
    )
    sp.add_argument(
        "--plan",
        action="store_true",
        help="TensorRT: print what the build would do (network and builder flags, optimization profiles "
        "with shape-tensor values, engine directory, device cache key) for each TensorRT version in "
        "--tensorrt-version; needs neither TensorRT nor a GPU, and changes nothing",
    )
    sp.add_argument(
        "--tensorrt-version",
        action="append",
        metavar="VERSION",
        help="with --plan: a TensorRT version to plan for, as tensorrt.__version__ spells it "
        "(repeatable; default 10.3.0 and 11.1.0)",
    )
    sp.add_argument(
        "--version-compatible",
        action="store_true",
        help="TensorRT: engines that later TensorRT versions of the same major can run (they embed "
        "their lean runtime, which mmedge lets TensorRT run for engines whose hash it recorded)",
    )
    sp.add_argument(
        "--hardware-compatibility",
        default="none",
        choices=HARDWARE_LEVELS,
        help="TensorRT: ampere_plus builds one engine for every GPU from Ampere on, at some speed cost",
    )
    sp.add_argument(
        "--workspace-mb",
        type=int,
        default=None,
        help="TensorRT: the builder's workspace in MiB (unset: 2048)",
    )
    sp.add_argument(
        "--compute-capability",
        default="8.7",
        help="with --plan: the GPU's compute capability (8.7: Jetson Orin)",
    )
    sp.add_argument("--gpu-name", default="Orin", help="with --plan: the GPU's name as CUDA reports it")
    sp.add_argument("--platform", default="linux-aarch64", help="with --plan: <sys.platform>-<machine>")

    sp = add(
        "verify",
        verbs.cmd_verify,
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
        verbs.cmd_sign,
        "verify a package, then sign its manifest (Ed25519) into manifest.sig; "
        "calibrate and build remove the signature, so sign last",
    )
    sp.add_argument("package", help=PACKAGE_HELP)
    sp.add_argument(
        "--key",
        required=True,
        help="unencrypted PEM Ed25519 private key, readable by its owner only (mmedge keygen)",
    )
    sp = add(
        "keygen", verbs.cmd_keygen, "write a new Ed25519 signing key pair: mmedge-signing.key (0600) and .pub"
    )
    sp.add_argument("--out", required=True, help="folder for the key pair (created with mode 0700)")
    sp.add_argument("--force", action="store_true", help="replace a key pair already in --out")
    sp = add(
        "inspect", verbs.cmd_inspect, "show a package's manifest: family, roles, paths, precisions, builds"
    )
    sp.add_argument("package", help=PACKAGE_HELP)

    sp = add(
        "eval",
        verbs.cmd_eval,
        "task metrics on held-out data (retrieval: recall@1/@5 both ways; "
        "chat: VQA accuracy and caption exact-match; classification: accuracy per modality on "
        "held-out synthetic clouds, recordings and traces)",
    )
    runtime_opts(sp)
    sp.add_argument(
        "--data",
        default=None,
        help=DATA_HELP
        + " (default: shapes:500 for retrieval, shapes:100 for chat packages, which need shapes:N)",
    )
    sp.add_argument(
        "--limit",
        type=int,
        default=None,
        help="retrieval: evaluate on the first N items; classification: N items per modality (600)",
    )
    sp.add_argument(
        "--rerank",
        type=int,
        default=None,
        metavar="K",
        help="retrieval with an ITM component: also text->image R@1 among hard negatives (--limit or 500 "
        "held-out scenes and --edits one-attribute edits of each), contrastive against ITM re-ranking of "
        "the top K (default 16; 0: skip)",
    )
    sp.add_argument(
        "--edits",
        type=int,
        default=1,
        metavar="N",
        help="one-attribute edits of each scene in the hard-negative gallery (default 1)",
    )
    sp.add_argument(
        "--questions", type=int, default=None, help="chat: colour/shape/count questions asked (300)"
    )
    sp.add_argument("--captions", type=int, default=None, help="chat: scenes captioned (100)")

    sp = add(
        "pack",
        verbs.cmd_pack,
        "write a device bundle: only what one target runs (one precision per component, its build or "
        "Q/DQ graph, tokenizer, preprocessing), verified like any package (docs/bundles.md)",
    )
    sp.add_argument("package", help=PACKAGE_HELP)
    sp.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")
    sp.add_argument(
        "--target",
        default="ort-cpu",
        choices=BUNDLE_TARGETS,
        help="ort-cpu: ORT builds for this onnxruntime version and CPU family; ort-cuda / ort-tensorrt: "
        "Q/DQ graphs for ORT's CUDA / TensorRT execution providers; tensorrt: Q/DQ graphs whose engines the "
        "device builds on first use",
    )
    sp.add_argument(
        "--precision",
        default="int8",
        choices=AUTO_ORDER,
        help="the most compressed precision to carry; a component without it takes the next less compressed "
        "one it has (int4 -> int8 -> fp16 -> fp32)",
    )
    sp.add_argument(
        "--portable",
        action="store_true",
        help="ort-cpu: carry the Q/DQ graphs instead of this onnxruntime's builds (any version and CPU; slower)",
    )
    sp.add_argument("--force", action="store_true", help="replace --out even if it holds other files")
    sp.add_argument(
        "--paths",
        type=_csv(str),
        default=None,
        help="comma-separated pipeline paths to carry (e.g. image,text,imu of an ImageBind package); "
        "components only the other paths use are left out (default: every path)",
    )

    sp = add(
        "bench",
        verbs.cmd_bench,
        "per-component latency (p50/p90) and throughput; --vs torch compares to PyTorch",
    )
    runtime_opts(sp)
    sp.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    sp.add_argument(
        "--runs", type=int, default=None, help="timed runs per engine (30); with --load, processes (5)"
    )
    sp.add_argument(
        "--vs",
        choices=["torch"],
        default=None,
        help="also time PyTorch eager (and ORT fp32 when --precision is not fp32) on the same inputs",
    )
    sp.add_argument(
        "--components", type=_csv(str), default=None, help="comma-separated components to time (default: all)"
    )
    sp.add_argument(
        "--load",
        action="store_true",
        help="instead: what opening the package costs, in --runs fresh processes (default 5): import, "
        "open and first-call times (one 640x480 frame embedded or captioned) and peak RSS, medians",
    )
    sp.add_argument(
        "--preload",
        default=None,
        metavar="PATH",
        help="with --load: open with sdk.Pipeline(preload=PATH), e.g. 'image' (its loading then counts as open)",
    )

    def rosbag_opts(sp: argparse.ArgumentParser, out: bool = True) -> None:
        g = sp.add_argument_group(
            "ROS bags: run over a topic's images, one JSONL line per message, keyed by its timestamp "
            "(docs/ros2.md)"
        )
        g.add_argument(
            "--rosbag", default=None, metavar="BAG", help="a ROS 2 (or ROS 1) bag, instead of files"
        )
        g.add_argument("--topic", default=None, help="its sensor_msgs/Image or CompressedImage topic")
        g.add_argument("--every", type=int, default=1, metavar="N", help="every Nth message of the topic")
        g.add_argument(
            "--max-rate",
            type=float,
            default=None,
            metavar="R",
            help="at most R messages a second of bag time",
        )
        if out:
            g.add_argument("--out", default=None, help="JSONL file to write, atomically (default: stdout)")

    def ray_opts(sp: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
        g = sp.add_argument_group(f"Ray: {what} (the ray extra; docs/ray.md)")
        g.add_argument("--ray", action="store_true", help=f"run on Ray: {what}")
        g.add_argument(
            "--ray-address",
            default=None,
            metavar="ADDR",
            help="the Ray instance to join (default: $RAY_ADDRESS, else the one started last on this host, "
            "else a new local one)",
        )
        return g

    sp = add("embed", verbs_retrieval.cmd_embed, "embed images, texts or another modality the package has")
    runtime_opts(sp)
    sp.add_argument(
        "images",
        nargs="*",
        help="image files, or files of --modality (with --ray: one image folder or JSONL file)",
    )
    sp.add_argument(
        "--text", action="append", default=None, help="a text to embed instead of images (repeatable)"
    )
    sp.add_argument("--modality", default="image", choices=EMBED_MODALITIES, help=MODALITY_HELP)
    sp.add_argument(
        "--out",
        default=None,
        help="write embeddings to this .npy file (with --rosbag: JSONL; with --ray: a folder of Parquet files)",
    )
    rosbag_opts(sp, out=False)
    g = ray_opts(
        sp,
        "embed SRC (an image folder or a JSONL file) with a pool of actors, one pipeline each, into Parquet "
        "files (id, path, vector) under --out; each actor runs --threads intra-op threads (0: 1) and reserves "
        "as many CPUs",
    )
    g.add_argument("--actors", type=int, default=None, help="actors in the pool (default 2)")
    g.add_argument("--batch-size", type=int, default=None, help="images per actor call (default 64)")

    sp = add(
        "search", verbs_retrieval.cmd_search, "build or load an index and search it with a text or an image"
    )
    runtime_opts(sp)
    sp.add_argument(
        "query", nargs="?", help="a text query (a string is always text; use --image for an image)"
    )
    sp.add_argument("--image", default=None, help="search with this image file instead of a text")
    sp.add_argument(
        "--modality",
        default=None,
        choices=EMBED_MODALITIES,
        help="the query is a file of this modality (e.g. audio: a WAV file); " + MODALITY_HELP,
    )
    sp.add_argument("--add", default=None, help=f"data to index first: {DATA_HELP}")
    sp.add_argument(
        "--add-modality",
        type=_csv(str),
        default=None,
        metavar="LIST",
        help="with --add shapes:N: index these of each scene (comma-separated from image, text, audio, "
        "depth, thermal, imu; default image), labelled 'scene I (MODALITY)'",
    )
    sp.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip images that cannot be read (listed in the output) instead of stopping",
    )
    sp.add_argument(
        "--index",
        default=None,
        help="index to load / save: a usearch directory, milvus-lite://FILE.db?collection=NAME (a local "
        "Milvus Lite file) or milvus://HOST:PORT/COLLECTION (a Milvus server; docs/indexes.md)",
    )
    sp.add_argument(
        "--remove",
        type=_csv(int),
        default=None,
        metavar="IDS",
        help="comma-separated ids to remove from the index",
    )
    sp.add_argument("-k", type=int, default=5)
    sp.add_argument(
        "--rerank",
        type=int,
        default=None,
        metavar="K",
        help="re-score the contrastive top K with the package's ITM component (default: 16 where it has "
        "one; 0: off; docs/retrieval.md)",
    )

    sp = add(
        "classify",
        verbs_retrieval.cmd_classify,
        "classify an image zero-shot against --labels (retrieval packages), or point clouds, audio or "
        "IMU traces into the package's own classes (classification packages: --modality)",
    )
    runtime_opts(sp)
    sp.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="retrieval: one image; classification: files of --modality (point clouds (N, 3 + F) and IMU "
        "traces (6, T) as .npy arrays, audio files such as WAV)",
    )
    sp.add_argument("--labels", default=None, help="retrieval: comma-separated labels (required)")
    sp.add_argument(
        "--modality",
        default=None,
        choices=CLASSIFY_MODALITIES,
        help="what the files are (default: image for a retrieval package, the only modality of a "
        "classification package that has one)",
    )
    sp.add_argument(
        "-k",
        "--top-k",
        type=int,
        default=None,
        help="labels shown per file, best first (default: every label for retrieval, 5 for classification)",
    )
    sp.add_argument(
        "--sample-rate",
        type=int,
        default=None,
        metavar="HZ",
        help="audio given as .npy arrays (frames,) or (frames, channels): their sample rate",
    )

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
        g.add_argument(
            "--num-beams", type=int, default=1, help="beam search with N beams (1 = off, at most 8)"
        )
        g.add_argument(
            "--length-penalty", type=float, default=1.0, help="beam score: logprob sum / length**P"
        )
        g.add_argument(
            "--early-stopping",
            choices=("false", "true", "never"),
            default="false",
            help="when beam search ends (as Hugging Face's early_stopping)",
        )

    sp = add("caption", verbs.cmd_caption, "caption an image with a chat package (e.g. BLIP-2)")
    runtime_opts(sp)
    sp.add_argument("image", nargs="?", default=None, help="image file (not with --rosbag)")
    gen_opts(sp)
    rosbag_opts(sp)

    sp = add(
        "chat",
        verbs.cmd_chat,
        "ask about an image; without a question, an interactive multi-turn chat; "
        "with --rosbag BAG --topic T, one question asked of every frame: chat PKG --rosbag BAG --topic T QUESTION",
    )
    runtime_opts(sp)
    sp.add_argument("image", nargs="?", default=None, help="image file (with --rosbag: the question)")
    sp.add_argument("question", nargs="?", default=None)
    gen_opts(sp)
    rosbag_opts(sp)

    sp = add("generate", verbs.cmd_generate, "continue a text prompt with a causal-LM package (streamed)")
    runtime_opts(sp)
    sp.add_argument("prompt")
    gen_opts(sp)

    verbs_image.add_verb(add, runtime_opts)

    sp = add(
        "data",
        verbs.cmd_data,
        "write sample inputs: N synthetic scene images and a captions JSONL beside them",
    )
    sp.add_argument("kind", choices=["scenes"], help="what to write")
    sp.add_argument("count", type=int, help="how many images")
    sp.add_argument("--out", required=True, help="folder to write (created; existing files are kept)")
    sp.add_argument("--size", type=int, default=224, help="image side in pixels")
    sp.add_argument("--seed", type=int, default=None, help="scene seed (default: the held-out seed)")
    sp.add_argument(
        "--train", action="store_true", help="draw from the training seed instead of the held-out one"
    )

    add("list", verbs.cmd_list, "list the packages in the model store ($MMEDGE_HOME)")

    sp = add(
        "serve",
        verbs.cmd_serve,
        "serve packages over HTTP with OpenAI's API: /v1/chat/completions (chat and generation "
        "packages), /v1/embeddings, /v1/search and /v1/index/* (retrieval), /v1/models, /health, "
        "/ready, /metrics (needs the serve extra; see docs/serving.md)",
        json_flag=False,
    )
    serve_arguments(sp, PACKAGE_HELP)
    g = ray_opts(
        sp,
        "the same app as a Ray Serve deployment of --replicas replicas behind Ray's HTTP proxy on --host/--port "
        "(a fixed port); each replica reserves max(1, --threads) CPUs",
    )
    g.add_argument("--replicas", type=int, default=None, help="replicas of the app (default 2)")

    sp = add(
        "demo",
        verbs.cmd_demo,
        "the whole path: clip-tiny retrieval and blip2-tiny VQA/captions — train, export, "
        "quantize, build, evaluate, benchmark; prints tables (10-13 minutes on 2 idle cores without AMX). "
        "`mmedge demo llava` runs llava-tiny instead: on the store's trained clip-tiny (trained first "
        "if there is none), LLaVA's stages, INT8 vision/projector and INT4 LLM, VQA with position "
        "questions beside the truth. `mmedge demo fusion` runs blip-tiny: on the same clip-tiny, BLIP's "
        "ITC + ITM + LM training, retrieval with ITM re-ranking among near-duplicates and captions, fp32 "
        "against quantized. `mmedge demo anymodal` runs imagebind-tiny (audio, depth, thermal and IMU bound "
        "to clip-tiny's image space; cross-modal and emergent text retrieval) and meta-transformer-tiny "
        "(point-cloud, audio and IMU classification around clip-tiny's frozen trunk). `mmedge demo generate` "
        "trains sd-tiny (text-to-image) and judges what it draws for held-out captions, fp32 against INT8",
    )
    sp.add_argument(
        "family",
        nargs="?",
        choices=DEMO_FAMILIES,
        default=None,
        help="llava: the llava-tiny part alone; fusion: blip-tiny alone; anymodal: imagebind-tiny and "
        "meta-transformer-tiny; generate: sd-tiny; default: clip-tiny then blip2-tiny",
    )
    sp.add_argument(
        "--clip-only", action="store_true", help="stop after the clip-tiny part (about 6 minutes)"
    )
    sp.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: preset's demo setting); with llava, of every stage",
    )
    sp.add_argument("--eval-n", type=int, default=500, help="held-out scenes for clip-tiny retrieval")
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--seed", type=int, default=0, help="seed of every training")
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
            warnings.showwarning = lambda message, *_args, **_kw: verbs._note(str(message))
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
