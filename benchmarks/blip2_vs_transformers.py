"""End-to-end caption latency, mmedge vs transformers eager, on BLIP-2-base-sized random weights.

ViT-B/16 at 224, a 12-layer Q-Former with 32 queries and OPT-125M, saved with transformers'
save_pretrained; mmedge exports it, quantizes (INT8 encoders, INT4 LLM) and builds for ORT. Timed:
image + 8-token prompt + 20 new tokens, greedy, in one process, medians of alternating runs.

    .venv/bin/python benchmarks/blip2_vs_transformers.py --workdir /tmp/blip2-bench [--threads 2]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from vs_transformers import compare, main


def setup(work: Path) -> None:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models

    from mmedge.calibration.package import calibrate_package
    from mmedge.export.exporter import export_model

    torch.manual_seed(0)
    cfg = tf.Blip2Config(
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
            "qkv_bias": True,
        },
        qformer_config={
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "cross_attention_frequency": 2,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": 50272,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "ffn_dim": 3072,
            "num_attention_heads": 12,
            "max_position_embeddings": 2048,
            "word_embed_proj_dim": 768,
            "bos_token_id": 2,
            "eos_token_id": 2,
            "pad_token_id": 1,
        },
        num_query_tokens=32,
        image_token_index=50265,
    )
    tf.Blip2ForConditionalGeneration(cfg).eval().save_pretrained(work / "hf")
    tf.BlipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(work / "hf")
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(1000)}, unk_token="t3")).save(
        str(work / "hf" / "tokenizer.json")
    )
    export_model(work / "hf", work / "pkg", progress=print)
    # calibrate builds for ORT too (the in-place cache and prefill builds of the LLM)
    calibrate_package(work / "pkg", "train-shapes:96", samples=64, weight_bits=(4,), progress=print)


def bench(work: Path, threads: int, runs: int) -> dict:
    import torch
    import transformers as tf

    from mmedge.runtime.backends.base import SessionOptions
    from mmedge.runtime.components import ComponentRunner
    from mmedge.sdk.bench import generation_prompt, generation_timer

    torch.set_num_threads(threads)
    hf = tf.Blip2ForConditionalGeneration.from_pretrained(work / "hf", attn_implementation="eager").eval()
    runner = ComponentRunner(work / "pkg", options=SessionOptions(threads=threads))
    ours = generation_timer(runner)  # the same inputs, prompt length and token count as below
    px = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32))
    ids = torch.tensor([[50265] * 32 + generation_prompt(runner)])

    def theirs() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(pixel_values=px, input_ids=ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        return time.perf_counter() - t0

    return {
        "threads": threads,
        **compare(ours, theirs, runs),
        "precisions": {c: runner.precision_of(c) for c in runner.manifest.components},
    }


if __name__ == "__main__":
    main(__doc__, setup, bench)
