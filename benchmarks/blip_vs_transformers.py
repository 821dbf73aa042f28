"""BLIP-base-sized captioning and ITM re-ranking, mmedge vs transformers eager, on random weights.

ViT-B/16 at 384 px (577 image tokens) and a BERT-base text model (hidden 768, 12 layers, 12
heads, vocabulary 30524 with a locally written WordPiece tokenizer), saved with transformers'
save_pretrained as `BlipForConditionalGeneration` (part `caption`) and `BlipForImageTextRetrieval`
(part `itm`); mmedge exports each, calibrates (INT8 vision; INT8 text encoder for ITM; weight-only
cross_kv, token embedding and decoder step, see WEIGHT_BITS) and builds for ORT. Timed in one
process, medians of alternating runs, 2 threads by default:

- caption: one image + [DEC] and a 7-token prompt + 20 new tokens, greedy (min_new_tokens=20 on
  both sides), mmedge's image path + cross_kv + generation against HF's `generate` with eager
  attention; mmedge's vision, cross_kv, prefill and decode figures are reported on their own.
- itm: one query text against 16 candidate images, the 16 pairs in one batch: ITM alone on the
  images' features (features computed beforehand on both sides), and image encoding + ITM (the
  16 images' pixels through the vision tower, then ITM). Pixels are preprocessed beforehand on
  both sides.

    .venv/bin/python benchmarks/blip_vs_transformers.py --workdir /tmp/blip-bench [--threads 2] [--runs 5] [--part caption|itm]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from vs_transformers import compare, main

VOCAB, BOS, SEP, PAD = 30524, 30522, 102, 0  # HF BlipTextConfig's defaults: [DEC] = 30522, [SEP] = 102
SIZE, CANDIDATES = 384, 16
WEIGHT_BITS = (8,)  # the decoder's weight-only precision (see benchmarks/RESULTS.md for the choice)
# English words of the benchmark's prompts (mmedge's SAMPLE_TEXT and the ITM query); the rest are fillers
WORDS = ["a", "small", "red", "blue", "green", "large", "circle", "square", "star", "at", "the", "top"]
WORDS += ["left", "right", "and", "in", "center", "of", "picture"]


def _tokenizer():
    """A BERT-style WordPiece tokenizer of VOCAB ids: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103, some English words, filler tokens, [DEC] at 30522."""
    import transformers as tf
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    names = [specials.get(i, f"[unused{i}]") for i in range(1000)]
    names += WORDS + [f"w{i}" for i in range(BOS - 1000 - len(WORDS))]
    vocab = {w: i for i, w in enumerate(names)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 101), ("[SEP]", 102)]
    )
    tok.add_special_tokens(list(specials.values()))
    hf = tf.BertTokenizerFast(tokenizer_object=tok)
    hf.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder start token, after the vocabulary
    return hf


def _config():
    import transformers as tf

    return tf.BlipConfig(
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": SIZE,
            "patch_size": 16,
        },
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 512,
            "bos_token_id": BOS,
            "sep_token_id": SEP,
            "pad_token_id": PAD,
        },
    )


def setup(work: Path, part: str) -> None:
    import torch
    import transformers as tf
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from mmedge.calibration.package import calibrate_package
    from mmedge.export.exporter import export_model

    torch.manual_seed(0)
    cls = tf.BlipForConditionalGeneration if part == "caption" else tf.BlipForImageTextRetrieval
    cls(_config()).eval().save_pretrained(work / "hf")
    processor = tf.BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}), tokenizer=_tokenizer()
    )
    processor.save_pretrained(work / "hf")
    export_model(work / "hf", work / "pkg", progress=print)
    # calibrate builds for ORT too
    calibrate_package(work / "pkg", "train-shapes:96", samples=64, weight_bits=WEIGHT_BITS, progress=print)


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def bench(work: Path, threads: int, runs: int, part: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    return (_bench_caption if part == "caption" else _bench_itm)(work, threads, runs)


def _bench_caption(work: Path, threads: int, runs: int) -> dict:
    import torch
    import transformers as tf

    from mmedge.runtime.backends.base import SessionOptions
    from mmedge.runtime.components import ComponentRunner
    from mmedge.sdk.bench import generation_prompt, generation_timer

    hf = tf.BlipForConditionalGeneration.from_pretrained(work / "hf", attn_implementation="eager").eval()
    runner = ComponentRunner(work / "pkg", options=SessionOptions(threads=threads))
    ours = generation_timer(runner)  # the same prompt and token count as below; its own pixels
    px = torch.from_numpy(_pixels(1))
    # HF's generate replaces the first id with [DEC] and drops the last ([SEP]): the decoder reads
    # the same [DEC] + 7 prompt tokens as mmedge's
    ids = torch.tensor([[*generation_prompt(runner), SEP]])

    def theirs() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                pixel_values=px, input_ids=ids, max_new_tokens=20, min_new_tokens=20, do_sample=False
            )
        if out.shape[1] != ids.shape[1] - 1 + 20:
            raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1] + 1} tokens, not 20")
        return time.perf_counter() - t0

    return {
        "threads": threads,
        **compare(ours, theirs, runs),
        "precisions": {c: runner.precision_of(c) for c in runner.manifest.components},
    }


def _bench_itm(work: Path, threads: int, runs: int) -> dict:
    import torch
    import transformers as tf

    from mmedge.runtime.backends.base import SessionOptions
    from mmedge.runtime.components import ComponentRunner
    from mmedge.runtime.retrieval import RetrievalPipeline

    hf = tf.BlipForImageTextRetrieval.from_pretrained(work / "hf", attn_implementation="eager").eval()
    pipe = RetrievalPipeline(ComponentRunner(work / "pkg", options=SessionOptions(threads=threads)))
    runner = pipe.runner
    query = "a small red circle at the top left"
    pixels = _pixels(CANDIDATES)
    px = torch.from_numpy(pixels)
    tok = runner.tokenizer.encode_batch([query] * CANDIDATES)
    ids, mask = torch.from_numpy(tok[0]), torch.from_numpy(tok[1])

    def ours_encode() -> dict[str, np.ndarray]:
        return runner.run_path_values("image", {"pixel_values": pixels})

    features = ours_encode()

    def ours_itm(values: dict[str, np.ndarray] = features) -> np.ndarray:
        # what search(rerank=16) runs on the candidates' image path values
        return pipe._score(lambda a, b: {k: v[a:b] for k, v in values.items()}, [query] * CANDIDATES)

    with torch.inference_mode():
        hf_features = hf.vision_model(pixel_values=px)[0]

    def theirs_itm(feats: torch.Tensor = hf_features) -> torch.Tensor:
        # BlipForImageTextRetrieval.forward(use_itm_head=True) after its vision model
        att = torch.ones(feats.shape[:-1], dtype=torch.long)
        out = hf.text_encoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=feats, encoder_attention_mask=att
        )
        return hf.itm_head(out[0][:, 0, :])

    # the same scores on both sides (random weights: the ITM path's output, not its accuracy)
    with torch.inference_mode():
        full = hf(input_ids=ids, attention_mask=mask, pixel_values=px, use_itm_head=True)[0]
        ref = torch.softmax(full, dim=1)[:, 1].numpy()
    agreement = float(np.abs(ours_itm() - ref).max())

    def timed(fn) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn()
        return time.perf_counter() - t0

    def as_ms(fn):
        return lambda: {"e2e_ms": timed(fn) * 1e3}

    def hf_full() -> None:
        hf(input_ids=ids, attention_mask=mask, pixel_values=px, use_itm_head=True)

    return {
        "threads": threads,
        "pairs": CANDIDATES,
        "itm_only": compare(as_ms(ours_itm), lambda: timed(theirs_itm), runs),
        "image_encode_and_itm": compare(as_ms(lambda: ours_itm(ours_encode())), lambda: timed(hf_full), runs),
        "max_abs_diff_match_probability": round(agreement, 4),
        "precisions": {c: runner.precision_of(c) for c in runner.manifest.components},
    }


if __name__ == "__main__":
    main(__doc__, setup, bench, parts=("caption", "itm"))
