"""Size of an install, by distribution: what `pip install mmedge` (or any extras) puts on a disk.

Each installed distribution's size is the sum of the sizes of the files its RECORD lists (the
files pip wrote, compiled .pyc included); the total is that of mmedge and everything it requires,
so the venv's own pip and setuptools are listed apart. Also lists which distributions each of
mmedge's direct requirements pulls in, and times `from mmedge import sdk` in fresh processes.

    python3.11 -m venv /tmp/dev-venv && /tmp/dev-venv/bin/pip install .
    python benchmarks/install_size.py /tmp/dev-venv [--import-runs 5] [--json out.json]

Stdlib only: the measuring part runs under the venv's own interpreter, so markers (python
version, platform, extras) are evaluated as pip evaluated them there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# Runs inside the measured venv; prints one JSON document.
_INSIDE = r"""
import json, re, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv has pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

dists = {}
for d in metadata.distributions():
    size = 0
    for f in d.files or ():
        p = f.locate()
        try:
            size += p.stat().st_size
        except OSError:  # listed but absent (e.g. a .pyc never written)
            pass
    dists[norm(d.metadata["Name"])] = {"name": d.metadata["Name"], "version": d.version, "bytes": size}

def requires(name, extras=()):
    out = []
    for spec in metadata.requires(name) or ():
        req = Requirement(spec)
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is None or any(req.marker.evaluate(env) for env in envs):
            if norm(req.name) in dists:
                out.append((norm(req.name), tuple(sorted(req.extras))))
    return out

def closure(name, extras=()):
    seen, todo = set(), [(norm(name), tuple(extras))]
    while todo:
        n, ex = todo.pop()
        key = (n, ex)
        if key in seen:
            continue
        seen.add(key)
        todo += requires(n, ex)
    return sorted({n for n, _ in seen})

root = sys.argv[1]
extras = tuple(e for e in sys.argv[2].split(",") if e)
direct = [n for n, _ in requires(root, extras)]
print(json.dumps({
    "python": sys.version.split()[0],
    "pip": dists.get("pip", {}).get("version"),
    "dists": dists,
    "closure": closure(root, extras),
    "direct": {n: closure(n) for n in direct},
}))
"""

# Wall and CPU seconds: on a shared machine the CPU time moves less with the load.
_IMPORT = (
    "import time; t, c = time.perf_counter(), time.process_time(); from mmedge import sdk; "
    "print(time.perf_counter() - t, time.process_time() - c)"
)


def measure(venv: Path, root: str = "mmedge", extras: str = "") -> dict:
    """Sizes of everything installed in `venv`, `root`'s requirement closure and its direct requirements."""
    py = venv / "bin" / "python"
    out = subprocess.run([str(py), "-c", _INSIDE, root, extras], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def import_times(venv: Path, runs: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of `from mmedge import sdk`, each in a fresh interpreter of `venv` (its cwd
    outside any checkout, so the installed copy is imported)."""
    py = venv / "bin" / "python"
    out = []
    for _ in range(runs):
        proc = subprocess.run([str(py), "-c", _IMPORT], check=True, capture_output=True, text=True, cwd=venv)
        wall, cpu = proc.stdout.split()
        out.append((float(wall), float(cpu)))
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:8.1f}"


def report(m: dict) -> str:
    """A Markdown table by distribution, largest first, then the total and who pulls what."""
    dists, inside = m["dists"], set(m["closure"])
    lines = ["| distribution | version | MB |", "|---|---|---:|"]
    for key in sorted(inside, key=lambda k: -dists[k]["bytes"]):
        d = dists[key]
        lines.append(f"| {d['name']} | {d['version']} | {_mb(d['bytes']).strip()} |")
    total = sum(dists[k]["bytes"] for k in inside)
    lines.append(f"| **total ({len(inside)} distributions)** | | **{_mb(total).strip()}** |")
    rest = sorted(set(dists) - inside)
    if rest:
        extra = ", ".join(f"{dists[k]['name']} {_mb(dists[k]['bytes']).strip()}" for k in rest)
        lines.append(f"\nAlso in the venv, not required by the install: {extra} (MB)")
    lines.append("\nPulled in by each direct requirement (its own closure; shared ones appear under each):\n")
    for name, deps in sorted(m["direct"].items(), key=lambda kv: -sum(dists[k]["bytes"] for k in kv[1])):
        size = sum(dists[k]["bytes"] for k in deps)
        lines.append(
            f"- {dists[name]['name']} ({_mb(size).strip()} MB): {', '.join(dists[k]['name'] for k in deps)}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("venv", type=Path, help="a virtual environment with mmedge installed")
    ap.add_argument("--extras", default="", help="comma-separated extras the install was made with")
    ap.add_argument(
        "--import-runs", type=int, default=5, help="fresh processes timing `from mmedge import sdk`"
    )
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()
    m = measure(args.venv, extras=args.extras)
    print(f"Python {m['python']}, pip {m['pip']}\n")
    print(report(m))
    if args.import_runs:
        times = import_times(args.venv, args.import_runs)
        m["import_s"] = times
        walls, cpus = [w for w, _ in times], [c for _, c in times]
        print(
            f"\n`from mmedge import sdk`, {len(times)} fresh processes: wall median {statistics.median(walls):.3f} s "
            f"({', '.join(f'{t:.3f}' for t in walls)}), CPU median {statistics.median(cpus):.3f} s"
        )
    if args.json:
        args.json.write_text(json.dumps(m, indent=1))


if __name__ == "__main__":
    sys.exit(main())
