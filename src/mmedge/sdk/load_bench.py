"""`mmedge bench --load`: what opening a package costs a device, measured in fresh processes.

Each run is a new Python process (nothing cached in memory, the OS page cache aside) that imports
`mmedge.sdk`, opens the package with `sdk.Pipeline` (with `preload`, if given) and makes the first call a device makes: one
camera-sized frame embedded (retrieval) or captioned (chat), or a short generation. It reports the
import, open and first-call times and the process's peak RSS (VmHWM: open and first call together,
what a device must have free). Medians over the runs, with their spread.

The child uses only the public API, so the same measurement runs against any mmedge version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import BackendError, InvalidInputError

FRAME = (480, 640, 3)  # a VGA camera frame, uint8 RGB

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from mmedge import sdk
t1 = time.perf_counter()
a = json.loads(sys.argv[1])

def rss_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return None

extra = {"preload": a["preload"]} if a["preload"] else {}
pipe = sdk.Pipeline(a["package"], backend=a["backend"], precision=a["precision"], threads=a["threads"], **extra)
t2 = time.perf_counter()
rss_open = rss_mb("VmRSS")
import numpy as np
frame = np.random.default_rng(0).integers(0, 256, a["frame"], dtype=np.uint8)
task = type(pipe).__name__
if hasattr(pipe, "embed_images"):
    pipe.embed_images([frame])
elif hasattr(pipe, "caption"):
    pipe.caption(frame, max_new_tokens=a["tokens"])
else:
    pipe.generate("Hello", max_new_tokens=a["tokens"])
t3 = time.perf_counter()
print(json.dumps({"pipeline": task, "import_s": t1 - t0, "open_s": t2 - t1, "first_call_s": t3 - t2,
                  "rss_open_mb": rss_open, "peak_rss_mb": rss_mb("VmHWM")}))
"""

_FIGURES = ("import_s", "open_s", "first_call_s", "rss_open_mb", "peak_rss_mb")


def load_once(
    package: str | os.PathLike[str],
    precision: str = "auto",
    threads: int = 2,
    backend: str = "ort",
    tokens: int = 8,
    python: str | None = None,
    env: dict[str, str] | None = None,
    preload: str | None = None,
) -> dict[str, Any]:
    """One fresh process: import, open, first call; its times (s) and memory (MB).

    `python` and `env` choose the interpreter and environment (e.g. another install to compare)."""
    args = {
        "package": str(package),
        "precision": precision,
        "threads": threads,
        "backend": backend,
        "tokens": tokens,
        "frame": list(FRAME),
        "preload": preload,
    }
    proc = subprocess.run(
        [python or sys.executable, "-c", _CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=Path(package).parent if Path(package).is_dir() else None,
        timeout=600,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise BackendError(f"the load measurement failed in its child process: {tail[0]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def bench_load(
    package: str | os.PathLike[str],
    precision: str = "auto",
    threads: int = 2,
    runs: int = 5,
    backend: str = "ort",
    tokens: int = 8,
    python: str | None = None,
    env: dict[str, str] | None = None,
    preload: str | None = None,
) -> dict[str, Any]:
    """Medians (and min/max) of `runs` fresh processes' import, open and first-call times and RSS."""
    if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= 100:
        raise InvalidInputError(f"runs must be an int in [1, 100], got {runs!r}")
    rows = [
        load_once(package, precision, threads, backend, tokens, python, env, preload) for _ in range(runs)
    ]
    out: dict[str, Any] = {
        "package": str(package),
        "pipeline": rows[0]["pipeline"],
        "precision": precision,
        "threads": threads,
        "runs": runs,
        "first_call": "embed_images" if "Retrieval" in rows[0]["pipeline"] else f"{tokens} tokens",
        "preload": preload,
    }
    for key in _FIGURES:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            digits = 3 if key.endswith("_s") else 1
            out[key] = round(float(np.median(values)), digits)
            out[key + "_spread"] = [round(min(values), digits), round(max(values), digits)]
    return out
