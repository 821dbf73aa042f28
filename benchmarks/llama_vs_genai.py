"""Decode tokens/s of an INT4 135M Llama: mmedge vs onnxruntime-genai's model builder, same checkpoint.

The checkpoint is a random-weight `LlamaForCausalLM` shaped like SmolLM-135M (30 layers, hidden
576, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied embeddings), written with
transformers' save_pretrained. mmedge exports it, quantizes the LLM to INT4 and builds for ORT;
onnxruntime-genai's builder converts the same directory with `-p int4 -e cpu`. Both then decode
greedily from the same prompt with the same thread count, alternating runs in one process; the
figure is the median over runs of (new tokens - 1) / time from the first to the last new token.

Needs `pip install onnxruntime-genai` in the same environment (not an mmedge dependency).

    .venv/bin/python benchmarks/llama_vs_genai.py --workdir /tmp/llama-bench [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VOCAB = 49152
PROMPT = 16


def setup(work: Path) -> None:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mmedge.calibration.package import calibrate_package
    from mmedge.export.exporter import export_model

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(work / "hf")
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t3"
    ).save_pretrained(work / "hf")
    export_model(work / "hf", work / "pkg", progress=print)
    # calibrate builds for ORT too (the in-place cache and prefill builds)
    calibrate_package(work / "pkg", "train-shapes:16", samples=16, weight_bits=(4,), progress=print)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(work / "hf"),
            "-o",
            str(work / "genai"),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(work / "cache"),
        ],
        check=True,
    )


def _genai_threads(work: Path, threads: int) -> None:
    path = work / "genai" / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=2))


def bench(work: Path, threads: int, runs: int, new_tokens: int) -> dict:
    import onnxruntime_genai as og

    from mmedge.runtime.backends.base import SessionOptions
    from mmedge.runtime.components import ComponentRunner
    from mmedge.runtime.generation import GenerationConfig, LanguageModel

    prompt = np.random.default_rng(0).integers(4, VOCAB, PROMPT).astype(np.int64)
    lm = LanguageModel(ComponentRunner(work / "pkg", options=SessionOptions(threads=threads)))
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    _genai_threads(work, threads)
    model = og.Model(str(work / "genai"))

    def decode_rate(stamps: list[float]) -> float:
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def ours() -> float:
        embeds = lm.embed(prompt[None])[0]
        stamps = [time.perf_counter() for _ in lm.generate_ids(embeds, cfg)]
        return decode_rate(stamps)

    def theirs() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=PROMPT + new_tokens, min_length=PROMPT + new_tokens, do_sample=False
        )
        gen = og.Generator(model, params)
        gen.append_tokens(prompt[None])  # prefill; its logits give the first new token
        stamps = [time.perf_counter()]
        while not gen.is_done():
            gen.generate_next_token()
            stamps.append(time.perf_counter())
        return decode_rate(stamps)

    ours(), theirs()
    mine, ref = [], []
    for _ in range(runs):
        mine.append(ours())
        ref.append(theirs())
    m, r = float(np.median(mine)), float(np.median(ref))
    return {
        "threads": threads,
        "runs": runs,
        "new_tokens": new_tokens,
        "prompt_tokens": PROMPT,
        "mmedge_decode_tokens_per_s": round(m, 1),
        "genai_decode_tokens_per_s": round(r, 1),
        "ratio": round(m / r, 3),
        "mmedge_runs": [round(x, 1) for x in mine],
        "genai_runs": [round(x, 1) for x in ref],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    if not (a.workdir / "genai" / "genai_config.json").is_file():
        a.workdir.mkdir(parents=True, exist_ok=True)
        setup(a.workdir)
    print(json.dumps(bench(a.workdir, a.threads, a.runs, a.new_tokens), indent=2))


if __name__ == "__main__":
    main()
