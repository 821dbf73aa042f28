"""What ONNX Runtime session settings do to a graph's load time, run time and peak memory.

Each setting is measured in fresh processes (peak RSS is a per-process high-water mark), on one
graph of a device bundle (`mmedge pack`: the graph with its weights in `<graph>.data`):

- `arrays`: how mmedge loads a bundle's graph: the weights handed over as arrays over the read
  bytes (`add_external_initializers`); `self-contained`: the same graph with its weights inside
  (as a full package's graphs are), handed over as one blob;
- `-noarena`: the CPU memory arena off; `-noprepack`: weight prepacking off; `-basic`: graph
  optimizations at "basic" instead of "all" (the build was optimized offline);
- `ort-format`: ORT's flatbuffer format from the same graph, read with
  `session.use_ort_model_bytes_directly`.

    .venv/bin/python benchmarks/ort_load_options.py BUNDLE/builds/ort1.32.0-cpu/vision.int8.onnx --runs 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM"))

mode, graph, blob_path, table_path = sys.argv[1:5]
base = hwm()
so = ort.SessionOptions()
so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 2, 1, 3
if "noarena" in mode:
    so.enable_cpu_mem_arena = False
if "noprepack" in mode:
    so.add_session_config_entry("session.disable_prepacking", "1")
if "basic" in mode:
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
t0 = time.perf_counter()
model = open(graph, "rb").read()
if mode.startswith("arrays"):
    blob = np.frombuffer(open(blob_path, "rb").read(), np.uint8)
    table = json.load(open(table_path))
    arrays = {k: blob[o : o + n].view(d).reshape(s) for k, (o, n, d, s) in table.items()}
    so.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
elif mode.startswith("ort-format"):
    so.add_session_config_entry("session.use_ort_model_bytes_directly", "1")
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
if mode.startswith("arrays"):
    del arrays, blob
del model
t1 = time.perf_counter()
feeds = {}
for i in sess.get_inputs():
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
times = []
for _ in range(6):
    a = time.perf_counter()
    sess.run(None, feeds)
    times.append(time.perf_counter() - a)
print(json.dumps({"create_s": t1 - t0, "run_ms": 1000 * float(np.median(times[1:])), "base_mb": base, "peak_mb": hwm()}))
"""

MODES = (
    "arrays",
    "arrays-noarena",
    "arrays-noprepack",
    "arrays-basic",
    "self-contained",
    "self-contained-noprepack",
    "ort-format",
)


def _prepare(graph: Path, work: Path) -> dict[str, tuple[str, str, str]]:
    """Per mode: (graph file, weights file, table file) it loads."""
    import onnx
    import onnxruntime as ort
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(graph))  # with its external data
    inline = work / "inline.onnx"
    onnx.save(model, str(inline))
    blob, table = bytearray(), {}
    for t in model.graph.initializer:
        if len(t.raw_data) >= 1024:
            table[t.name] = [
                len(blob),
                len(t.raw_data),
                np.dtype(tensor_dtype_to_np_dtype(t.data_type)).str,
                list(t.dims),
            ]
            blob += t.raw_data
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            e = t.external_data.add()
            e.key, e.value = "location", "in-memory"
    (work / "graph.onnx").write_bytes(model.SerializeToString())
    (work / "weights.bin").write_bytes(bytes(blob))
    (work / "table.json").write_text(json.dumps(table))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(work / "model.ort")
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(inline), so, providers=["CPUExecutionProvider"])
    arrays = (str(work / "graph.onnx"), str(work / "weights.bin"), str(work / "table.json"))
    return {
        m: arrays
        if m.startswith("arrays")
        else ((str(work / "model.ort"),) if m == "ort-format" else (str(inline),)) + ("", "")
        for m in MODES
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("graph", type=Path, help="a bundle graph (its weights in <graph>.data beside it)")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = _prepare(a.graph, Path(tmp))
        for _ in range(a.runs):  # rounds: every mode once per round, so noise hits them alike
            for mode in MODES:
                proc = subprocess.run(
                    [sys.executable, "-c", _CHILD, mode, *files[mode]], capture_output=True, text=True
                )
                row = json.loads(proc.stdout) if proc.returncode == 0 else {"failed": proc.returncode}
                out.setdefault(mode, []).append(row)
    report = {}
    for mode, rows in out.items():
        ok = [r for r in rows if "failed" not in r]
        if not ok:
            report[mode] = {"failed": rows[0]["failed"]}
            continue
        report[mode] = {k: round(float(np.median([r[k] for r in ok])), 3) for k in ok[0]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
