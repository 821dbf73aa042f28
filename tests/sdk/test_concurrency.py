"""Pipelines called from many threads: same results as serial, no deadlock, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from mmedge import sdk
from mmedge.data import generate_scenes

pkg, chat_pkg, mode = sys.argv[1], sys.argv[2], sys.argv[3]
p = sdk.Pipeline(pkg)
c = sdk.Pipeline(chat_pkg)
imgs = [s.image for s in generate_scenes(12, seed=21)]
p.add_images(imgs[:6], labels=[str(i) for i in range(6)])
texts = ["a red circle", "a large blue square at the top left", "a small star in the center", "two shapes"]

def request(i):
    kind = i % 4
    if kind == 3:
        return ("caption", c.caption(imgs[i % 12], max_new_tokens=6, min_new_tokens=6))
    if kind == 0:
        return ("embed_image", p.embed_images([imgs[i % 12]]).round(6).tolist())
    if kind == 1:
        return ("embed_text", p.embed_texts([texts[i % 4]]).round(6).tolist())
    return ("search", [(h.id, round(h.score, 5)) for h in p.search(texts[i % 4] if i % 2 else imgs[i % 12], k=3)])

n = 8 * 50
if mode == "serial":
    out = [request(i) for i in range(n)]
else:
    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(request, range(n), timeout=300))
print(json.dumps({"out": out, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _run(pkg: Path, chat_pkg: Path, mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(pkg), str(chat_pkg), mode],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_threads_match_serial(tiny_pkg_session: Path, chat_pkg_session: Path) -> None:
    """embed image / embed text / search on a retrieval pipeline and caption on a chat pipeline."""
    serial = _run(tiny_pkg_session, chat_pkg_session, "serial")
    threaded = _run(tiny_pkg_session, chat_pkg_session, "threads")
    assert sum(kind == "caption" for kind, _ in serial["out"]) == 100
    assert threaded["out"] == serial["out"]
    assert threaded["maxrss_kb"] <= 1.5 * serial["maxrss_kb"], (threaded["maxrss_kb"], serial["maxrss_kb"])
