"""Build, check and time every component of a package on this GPU's TensorRT, and print a table to
paste into an issue (a Jetson or a datacenter GPU; needs `pip install 'mmedge[trt]'`).

For each component and precision: builds the engine (`mmedge build --backend tensorrt`, strongly
typed), reports its relative error against the source graph run by ONNX Runtime on the CPU on the
component's sample inputs, and times it: median of `--runs` runs of the engine on those inputs
(host copies included) against the source graph in ONNX Runtime on the CPU with `--threads`.

    python benchmarks/trt_check.py PKG [--precision auto] [--runs 20] [--threads 2] [--no-build]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any


def _median_ms(fn: Any, runs: int) -> float:
    fn()  # warm-up: first-run allocations and kernel selection
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def check(
    package: str, precision: str = "auto", runs: int = 20, threads: int = 2, build: bool = True
) -> list[dict]:
    """One row per engine of this TensorRT and GPU: component, precision, error vs source, times."""
    from mmedge.builds.package import build_package
    from mmedge.builds.sessions import ort_session
    from mmedge.builds.tensorrt import engine_error
    from mmedge.runtime.backends.tensorrt import TensorRTBackend, _trt, compute_capability
    from mmedge.runtime.feeds import sample_inputs
    from mmedge.runtime.package import verify_package
    from mmedge.runtime.store import resolve

    root = resolve(package)
    report = (
        build_package(root, backend="tensorrt", precision=precision, threads=threads)["builds"]
        if build
        else {}
    )
    rows = [
        {"component": k.split(".")[0], "precision": k.split(".", 1)[1], "skipped": r["skipped"]}
        for k, r in sorted(report.items())
        if "skipped" in r
    ]
    pkg = verify_package(root)
    here = (_trt().__version__, compute_capability())
    engines = [
        e for e in pkg.manifest.engines.values() if e.backend == "tensorrt" and (e.version, e.device) == here
    ]
    backend = TensorRTBackend()
    for key, rel in sorted(engines[0].files.items() if engines else ()):
        component, prec = key.split(".", 1)
        entry = pkg.manifest.components[component]
        source = pkg.root / entry.precisions[prec].file
        feeds = sample_inputs(pkg, entry)[0]
        session = backend.load(pkg, component, prec, _options())
        ort = ort_session(source, threads)
        err = engine_error(pkg, component, source, pkg.root / rel, pkg.manifest.files[rel].sha256, threads)
        rows.append(
            {
                "component": component,
                "precision": prec,
                "rel_error": err,
                "trt_ms": _median_ms(lambda s=session, f=feeds: s.run(f), runs),
                "ort_cpu_ms": _median_ms(lambda o=ort, f=feeds: o.run(None, f), runs),
            }
        )
    return rows


def _options() -> Any:
    from mmedge.runtime.backends.base import SessionOptions

    return SessionOptions(device="cuda")


def table(rows: list[dict]) -> str:
    from mmedge.runtime.backends.tensorrt import current_device

    d = current_device()
    head = (
        f"TensorRT {d.tensorrt}, {d.name} (compute capability {d.compute_capability}), {d.platform}, "
        f"Python {platform.python_version()}\n\n"
        "| component | precision | rel. error vs source | TensorRT ms | ORT CPU ms |\n|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['component']} | {r['precision']} | skipped: {r['skipped']} | | |")
        else:
            lines.append(
                f"| {r['component']} | {r['precision']} | {r['rel_error']:.1e} | {r['trt_ms']:.2f} | {r['ort_cpu_ms']:.2f} |"
            )
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", help="package directory or store name")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per component (median)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime CPU threads for the reference")
    ap.add_argument("--no-build", action="store_true", help="time the engines the package already has")
    a = ap.parse_args(argv)
    print(table(check(a.package, a.precision, a.runs, a.threads, build=not a.no_build)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
