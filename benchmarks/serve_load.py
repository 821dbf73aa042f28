"""Load test of `mmedge serve` (not in the test suite): 64 concurrent clients for 60 s of mixed chat
and embedding requests against clip-tiny + blip2-tiny, then embedding throughput with dynamic
batching against batch size 1.

Packages: `clip-tiny` and `blip2-tiny` from the model store (after `mmedge demo`) when present,
else random-weight ones made here (init_checkpoint + export; fp32, not calibrated). Speed does not
depend on the weights. Reports errors (only 429s, documented, are allowed), p50/p99 latency per
kind, the server's peak RSS and embeddings per second.

    .venv/bin/python benchmarks/serve_load.py --clients 64 --seconds 60 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def packages(work: Path) -> dict[str, Path]:
    from mmedge.runtime.store import list_packages, model_home

    stored = set(list_packages())
    out = {}
    for name in ("clip-tiny", "blip2-tiny"):
        if name in stored:
            out[name] = model_home() / name
            continue
        pkg = work / name
        if not (pkg / "manifest.json").is_file():
            from mmedge.export.exporter import export_model
            from mmedge.models.init import init_checkpoint

            ckpt = init_checkpoint(name, work / f"{name}-ckpt", seed=0, force=True)
            export_model(ckpt, pkg, name=name, force=True)
        out[name] = pkg
    return out


def start(pkgs: dict[str, Path], *options: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "mmedge.sdk.cli", "serve", *map(str, pkgs.values()), "--port", "0"]
    proc = subprocess.Popen([*cmd, "--log-level", "warning", *options], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            url = found.group(1)
            # keep reading the server's log, so that a full pipe never blocks it
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            break
    else:
        raise SystemExit(f"the server did not start (exit {proc.wait()})")
    try:
        deadline = time.monotonic() + 60
        while httpx.get(url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
    except BaseException:
        proc.terminate()  # never leave a server behind
        raise
    return proc, url


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scene_urls(n: int) -> list[str]:
    import cv2

    from mmedge.data import generate_scenes

    urls = []
    for scene in generate_scenes(n, seed=7, image_size=64):
        ok, buf = cv2.imencode(".png", scene.image[:, :, ::-1])
        assert ok
        urls.append("data:image/png;base64," + base64.b64encode(buf.tobytes()).decode())
    return urls


async def client_loop(
    url: str,
    seconds: float,
    mix: float,
    images: list[str],
    record: list[tuple[str, int, float, int]],
    seed: int,
) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            if rng.random() < mix:
                kind = "chat-stream" if rng.random() < 0.5 else "chat"
                body = {
                    "model": "blip2-tiny",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": rng.choice(images)}},
                                {
                                    "type": "text",
                                    "text": rng.choice(["what colour is the circle?", "how many shapes?"]),
                                },
                            ],
                        }
                    ],
                    "max_tokens": 16,
                    "temperature": 0,
                    "stream": kind == "chat-stream",
                }
                if kind == "chat-stream":
                    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                        async for _ in resp.aiter_lines():
                            pass
                else:
                    resp = await http.post("/v1/chat/completions", json=body)
                status, n = resp.status_code, 0
            else:
                if rng.random() < 0.5:
                    kind, inp = (
                        "embed-text",
                        f"a small {rng.choice(['red', 'green', 'blue'])} circle {rng.random():.6f}",
                    )
                else:
                    kind, inp = "embed-image", {"image": rng.choice(images)}
                resp = await http.post("/v1/embeddings", json={"model": "clip-tiny", "input": [inp]})
                status, n = resp.status_code, 1
            record.append((kind, status, time.perf_counter() - t0, n))
            if status == 429:  # the documented answer to a full queue: wait as told
                await asyncio.sleep(float(resp.headers.get("retry-after", "1")))


async def drive(url: str, clients: int, seconds: float, mix: float, images: list[str]) -> list[Any]:
    record: list[tuple[str, int, float, int]] = []
    await asyncio.gather(*(client_loop(url, seconds, mix, images, record, i) for i in range(clients)))
    return record


def summary(record: list[tuple[str, int, float, int]], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in sorted({r[0] for r in record}):
        rows = [r for r in record if r[0] == kind]
        ok = [r[2] for r in rows if r[1] == 200]
        out[kind] = {
            "requests": len(rows),
            "ok": len(ok),
            "429": sum(r[1] == 429 for r in rows),
            "errors": sum(r[1] not in (200, 429) for r in rows),
            "p50_ms": round(float(np.percentile(ok, 50)) * 1000, 1) if ok else None,
            "p99_ms": round(float(np.percentile(ok, 99)) * 1000, 1) if ok else None,
        }
    embedded = sum(r[3] for r in record if r[1] == 200)
    out["embeddings_per_s"] = round(embedded / seconds, 1)
    out["statuses"] = sorted({r[1] for r in record})
    return out


def run(
    pkgs: dict[str, Path], options: list[str], clients: int, seconds: float, mix: float, images: list[str]
) -> dict[str, Any]:
    proc, url = start(pkgs, *options)
    try:
        record = asyncio.run(drive(url, clients, seconds, mix, images))
        result = summary(record, seconds)
        result["server_peak_rss_mb"] = round(peak_rss_mb(proc.pid), 1)
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument(
        "--chat-share", type=float, default=0.25, help="share of requests that are chat completions"
    )
    ap.add_argument("--batch-seconds", type=float, default=15, help="length of each embedding-only run")
    ap.add_argument("--work", default="/tmp/mmedge-serve-load", help="where random-weight packages are made")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    pkgs = packages(work)
    images = scene_urls(16)
    results = {
        "packages": {k: str(v) for k, v in pkgs.items()},
        "clients": a.clients,
        "cpus": os.cpu_count(),
        "mixed": run(pkgs, [], a.clients, a.seconds, a.chat_share, images),
    }
    for size in (32, 1):
        results[f"embeddings_batch_{size}"] = run(
            pkgs, ["--batch-size", str(size)], a.clients, a.batch_seconds, 0.0, images
        )
    text = json.dumps(results, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
