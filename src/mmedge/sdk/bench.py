"""`mmedge bench`: per-component latency and throughput, optionally against the PyTorch reference.

Engines are timed in short blocks, rotating which goes first, on the same inputs in one process,
so machine noise hits them alike; report medians and the ratios, not single absolute times. Each
block starts with an untimed run: ONNX Runtime's worker threads keep spinning for a moment after
a run and would otherwise slow whichever engine comes next.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mmedge.errors import UnsupportedError
from mmedge.runtime.backends import DEFAULT_BACKEND
from mmedge.runtime.backends.base import SessionOptions
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.feeds import SAMPLE_TEXT, sample_feeds
from mmedge.runtime.store import resolve

WARMUP = 3
BLOCK = 5  # timed runs per engine per round


def _stats(times: list[float], batch: int) -> dict[str, float]:
    t = np.array(times) * 1e3
    p50 = float(np.percentile(t, 50))
    return {
        "p50_ms": round(p50, 3),
        "p90_ms": round(float(np.percentile(t, 90)), 3),
        "items_per_s": round(batch * 1e3 / p50, 2),
        "runs": len(times),
    }


def bench(
    package: str,
    precision: str = "auto",
    batches: list[int] | None = None,
    threads: int = 2,
    runs: int = 30,
    vs: str | None = None,
    backend: str = DEFAULT_BACKEND,
    components: list[str] | None = None,
) -> dict[str, Any]:
    """Median latencies per component and batch; with vs='torch' also PyTorch eager and ORT fp32. A
    package with an LLM also gets `generation`: image path, prefill, decode tokens/s, end to end."""
    path = resolve(package)
    opts = SessionOptions(threads=threads)
    main = ComponentRunner(path, backend=backend, precision=precision, options=opts)
    out: dict[str, Any] = {
        "package": main.manifest.name,
        "threads": threads,
        "backend": backend,
        "components": {},
    }
    for name in components or list(main.manifest.components):
        entry = main.manifest.component(name)
        if entry.role == "llm_step":
            # A decoder step runs with its KV cache, as generation runs it (a build may write the cache
            # in place and accept one sequence at a time): it is timed below, not on random feeds.
            continue
        label = f"{backend}-{main.precision_of(name)}"
        engines: dict[str, Callable] = {label: lambda f, n=name: main.session(n).run(f)}
        if vs == "torch":
            if main.precision_of(name) != "fp32":
                fp32 = ComponentRunner(main.package, backend=backend, precision="fp32", options=opts)
                engines[f"{backend}-fp32"] = lambda f, n=name, r=fp32: r.session(n).run(f)
            from mmedge.export.reference import torch_reference  # host side: needs torch

            engines["torch-eager"] = torch_reference(main.manifest, name, threads)
        res: dict[str, Any] = {}
        for b in batches or [1, 8]:
            text = entry.input("input_ids") is not None and main.manifest.tokenizer is not None
            feeds = sample_feeds(
                entry.inputs,
                entry.dims,
                entry.int_ranges,
                {"batch": b},
                tokenizer=main.tokenizer if text else None,
            )
            times: dict[str, list[float]] = {k: [] for k in engines}
            order = list(engines)
            for _ in range(WARMUP):
                for fn in engines.values():
                    fn(feeds)
            for rnd in range(-(-runs // BLOCK)):
                for k in order[rnd % len(order) :] + order[: rnd % len(order)]:
                    engines[k](feeds)  # untimed: absorbs the previous engine's spinning threads
                    for _ in range(min(BLOCK, runs - len(times[k]))):
                        t0 = time.perf_counter()
                        engines[k](feeds)
                        times[k].append(time.perf_counter() - t0)
            row = {k: _stats(v, b) for k, v in times.items()}
            ref = row[label]["p50_ms"]
            row["speedup_vs"] = {k: round(v["p50_ms"] / ref, 2) for k, v in row.items() if k != label}
            res[f"batch{b}"] = row
        out["components"][name] = res
    llm = main.manifest.by_role("llm_step") if main.manifest.has_role("llm_step") else None
    if main.manifest.has_role("question_encoder"):  # a VQA decoder: no question-less generation to time
        llm = None
    if llm is not None and (components is None or llm in components):
        timer = generation_timer(main)
        timer()  # warm-up
        parts = [timer() for _ in range(max(1, runs // BLOCK))]
        out["generation"] = {k: round(float(np.median([p[k] for p in parts])), 3) for k in parts[0]} | {
            "new_tokens": GEN_NEW_TOKENS,
            "prompt_tokens": GEN_PROMPT_TOKENS,
            "runs": len(parts),
        }
    return out


GEN_PROMPT_TOKENS, GEN_NEW_TOKENS = 8, 20


def generation_prompt(runner: ComponentRunner, tokens: int = GEN_PROMPT_TOKENS) -> list[int]:
    """The benchmark's prompt: `tokens` token ids of the sample text (repeated if short). A
    cross-attention decoder's (BLIP) starts as its caption prompt does: BOS ([DEC]), then the
    text's tokens without the tokenizer's specials."""
    if runner.manifest.has_role("cross_kv") and runner.manifest.llm is not None:
        words = runner.tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)
        return [runner.manifest.llm.bos_token_id, *(words * tokens)[: tokens - 1]]
    return (runner.tokenizer.encode(SAMPLE_TEXT) * tokens)[:tokens]


def generation_timer(
    runner: ComponentRunner, prompt_tokens: int = GEN_PROMPT_TOKENS
) -> Callable[[], dict[str, float]]:
    """One timed caption/generation: (image ->) 8-token prompt -> 20 new tokens, greedy.

    Returns ms for the image path (chat packages) and a separate prefill with an empty cache;
    `e2e_ms` = image path + the whole generation (its own prefill, then decoding); decode tokens/s
    from the first new token to the last. A cross-attention decoder (a `cross_kv` component) reads
    the image through cross keys/values, not positions: `cross_ms` is their computation, part of
    `e2e_ms`, and the prompt is its BOS and text tokens.
    """
    from mmedge.runtime.generation import GenerationConfig, LanguageModel

    lm = LanguageModel(runner)
    ids = generation_prompt(runner, prompt_tokens)
    sources = None
    if "image" in runner.manifest.pipeline.paths:
        first = runner.manifest.pipeline.paths["image"].steps[0].component
        entry = runner.manifest.component(first)
        pixels = sample_feeds(entry.inputs, entry.dims, sizes={"batch": 1})["pixel_values"]
        sources = runner.image_sources(pixels, SAMPLE_TEXT)
    cfg = GenerationConfig(max_new_tokens=GEN_NEW_TOKENS, min_new_tokens=GEN_NEW_TOKENS)
    if lm.cross_names:
        return _cross_generation_timer(runner, lm, ids, sources, cfg)

    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        embeds = lm.embed(np.array([ids]))[0]
        if sources is not None:  # the image's embeddings before the prompt (where a chat places them)
            prefix = runner.run_path("image", sources)[0]
            embeds = np.concatenate([prefix, embeds])
        t1 = time.perf_counter()
        lm.forward(embeds[None], lm.new_cache(), logits_to_keep=1)
        t2 = time.perf_counter()
        stamps = [time.perf_counter() for _ in lm.generate_ids(embeds, cfg)]  # one per new token
        if len(stamps) != GEN_NEW_TOKENS:
            raise RuntimeError("generation stopped early despite min_new_tokens")
        return {
            "image_ms": (t1 - t0) * 1e3,
            "prefill_ms": (t2 - t1) * 1e3,
            "e2e_ms": (t1 - t0 + stamps[-1] - t2) * 1e3,
            "decode_tokens_per_s": (GEN_NEW_TOKENS - 1) / max(stamps[-1] - stamps[0], 1e-9),
        }

    return run


def _cross_generation_timer(
    runner: ComponentRunner, lm: Any, ids: list[int], sources: dict[str, np.ndarray] | None, cfg: Any
) -> Callable[[], dict[str, float]]:
    """`generation_timer` for a decoder that cross-attends to the image path's output (BLIP
    captioning): image path -> `cross_kv` once -> prompt and new tokens with them bound, as
    `runtime.cross_chat` runs a caption."""
    m = runner.manifest
    if sources is None or m.has_role("question_encoder"):
        raise UnsupportedError(
            f"package {m.name!r}: generation is timed for captioning decoders only (no question encoder)"
        )
    cross_component = m.by_role("cross_kv")
    cross_input = m.component(cross_component).inputs[0].name

    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        embeds = lm.embed(np.array([ids]))[0]
        memory = runner.run_path_values("image", sources)[cross_input][:1]
        t1 = time.perf_counter()
        out = runner.run_batched(cross_component, {cross_input: memory})
        cross = {name: np.ascontiguousarray(value, np.float32) for name, value in out.items()}
        t2 = time.perf_counter()
        cache = lm.new_cache()
        cache.cross = cross
        lm.forward(embeds[None], cache, logits_to_keep=1)
        t3 = time.perf_counter()
        cache = lm.new_cache()
        cache.cross = cross
        stamps = [time.perf_counter() for _ in lm.generate_ids(embeds, cfg, cache)]
        if len(stamps) != GEN_NEW_TOKENS:
            raise RuntimeError("generation stopped early despite min_new_tokens")
        return {
            "image_ms": (t1 - t0) * 1e3,
            "cross_ms": (t2 - t1) * 1e3,
            "prefill_ms": (t3 - t2) * 1e3,
            "e2e_ms": (t2 - t0 + stamps[-1] - t3) * 1e3,
            "decode_tokens_per_s": (GEN_NEW_TOKENS - 1) / max(stamps[-1] - stamps[0], 1e-9),
        }

    return run
