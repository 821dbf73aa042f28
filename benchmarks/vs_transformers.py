"""What the `*_vs_transformers.py` benchmarks share: alternating timed runs and the command line.

Each benchmark writes a random-weight HF model (setup), then times mmedge's `generation_timer`
against transformers eager `generate` on the same inputs in one process, alternating runs so that
load on the machine hits both sides alike; figures are medians with their spread.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


def compare(
    ours: Callable[[], dict[str, float]], theirs: Callable[[], float], runs: int
) -> dict[str, object]:
    """Medians (and min/max) of `runs` alternating runs after one warm-up each; ours yields
    `generation_timer`'s dict (e2e_ms and parts), theirs seconds."""
    ours(), theirs()
    mine, ref = [], []
    for _ in range(runs):
        mine.append(ours())
        ref.append(theirs())
    e2e = [m["e2e_ms"] / 1e3 for m in mine]
    t, o = float(np.median(ref)), float(np.median(e2e))
    return {
        "runs": runs,
        "transformers_eager_s": round(t, 3),
        "transformers_eager_spread_s": [round(min(ref), 3), round(max(ref), 3)],
        "mmedge_s": round(o, 3),
        "mmedge_spread_s": [round(min(e2e), 3), round(max(e2e), 3)],
        "speedup": round(t / o, 2),
        **{f"mmedge_{k}": round(float(np.median([m[k] for m in mine])), 2) for k in mine[0] if k != "e2e_ms"},
    }


def main(
    doc: str,
    setup: Callable[..., None],
    bench: Callable[..., dict],
    parts: Sequence[str] = (),
) -> None:
    """`--workdir DIR [--threads N] [--runs N]`: set up once (kept in DIR), then benchmark. With
    `parts`, `--part NAME` runs one of them (default all): each is set up in DIR/NAME and
    `setup(dir, name)`, `bench(dir, threads, runs, name)` are called per part."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    if parts:
        ap.add_argument("--part", choices=[*parts, "all"], default="all")
    a = ap.parse_args()
    if not parts:
        if not (a.workdir / "pkg" / "manifest.json").is_file():
            a.workdir.mkdir(parents=True, exist_ok=True)
            setup(a.workdir)
        print(json.dumps(bench(a.workdir, a.threads, a.runs), indent=2))
        return
    chosen = list(parts) if a.part == "all" else [a.part]
    for part in chosen:
        if not (a.workdir / part / "pkg" / "manifest.json").is_file():
            (a.workdir / part).mkdir(parents=True, exist_ok=True)
            setup(a.workdir / part, part)
    out = {part: bench(a.workdir / part, a.threads, a.runs, part) for part in chosen}
    print(json.dumps(out, indent=2))
