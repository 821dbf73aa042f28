"""End-to-end chat latency, mmedge vs transformers eager, on a LLaVA-1.5-shaped model (random weights).

CLIP ViT-B width and depth (768, 12 layers) with patch 14 at 336 px (576 image tokens), read at
layer -2; LLaVA-1.5's two-Linear GELU projector; a Llama shaped like SmolLM-135M (30 layers,
hidden 576, 9 heads, 3 KV heads). Saved with transformers' save_pretrained; mmedge exports it,
quantizes (INT8 vision tower + projector, INT4 LLM with its prefill build) and builds for ORT.
Timed in one process, medians of alternating runs: image + 16-token prompt + 20 new tokens,
greedy; mmedge's prefill of the ~592-token prompt is reported on its own.

    .venv/bin/python benchmarks/llava_vs_transformers.py --workdir /tmp/llava-bench [--threads 2]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from vs_transformers import compare, main

VOCAB, IMAGE_TOKEN, PROMPT_TOKENS = 49152, 49151, 16


def setup(work: Path) -> None:
    import torch
    import transformers as tf
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from mmedge.calibration.package import calibrate_package
    from mmedge.export.exporter import export_model

    torch.manual_seed(0)
    cfg = tf.LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 336,
            "patch_size": 14,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    tf.LlavaForConditionalGeneration(cfg).eval().save_pretrained(work / "hf")
    LlavaImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    ).save_pretrained(work / "hf")
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB - 1)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<image>", special=True)])
    tok.save(str(work / "hf" / "tokenizer.json"))
    export_model(work / "hf", work / "pkg", progress=print, max_context=640)
    calibrate_package(work / "pkg", "train-shapes:96", samples=64, weight_bits=(4,), progress=print)


def bench(work: Path, threads: int, runs: int) -> dict:
    import torch
    import transformers as tf

    from mmedge.runtime.backends.base import SessionOptions
    from mmedge.runtime.components import ComponentRunner
    from mmedge.sdk.bench import generation_prompt, generation_timer

    torch.set_num_threads(threads)
    hf = tf.LlavaForConditionalGeneration.from_pretrained(work / "hf", attn_implementation="eager").eval()
    runner = ComponentRunner(work / "pkg", options=SessionOptions(threads=threads))
    ours = generation_timer(runner, PROMPT_TOKENS)  # image embeddings, then the prompt, as below
    px = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 336, 336)).astype(np.float32))
    ids = torch.tensor([[IMAGE_TOKEN] * 576 + generation_prompt(runner, PROMPT_TOKENS)])

    def theirs() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(pixel_values=px, input_ids=ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        return time.perf_counter() - t0

    return {
        "threads": threads,
        "prompt_positions": 576 + PROMPT_TOKENS,
        **compare(ours, theirs, runs),
        "precisions": {c: runner.precision_of(c) for c in runner.manifest.components},
    }


if __name__ == "__main__":
    main(__doc__, setup, bench)
