"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when installed."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from mmedge.errors import BackendError, DeadlineExceededError, UnbuiltPrecisionWarning, UnsupportedError
from mmedge.runtime.backends.base import SessionOptions, build_key, component_file
from mmedge.runtime.onnx_files import read_model
from mmedge.runtime.package import Package

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class _Deadlines:
    """One watchdog thread that sets `terminate` on the RunOptions of runs past their deadline.

    ORT checks the flag between kernels, so a run stops at the next node (a Loop's next
    iteration included). One thread for every session: a thread per run would cost more than a
    decode step."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, list[Any]]] = []  # (deadline, seq, [run_options, live, fired])
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self, run_options: Any, seconds: float) -> list[Any]:
        entry = [run_options, True, False]
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._seq), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="mmedge-run-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0][2] is entry:
                self._cond.notify()
        return entry

    def finish(self, entry: list[Any]) -> bool:
        """End a run's watch; True when its deadline had passed and it was told to stop."""
        with self._cond:
            entry[1] = False
            while self._heap and not self._heap[0][2][1]:  # runs end mostly in start order
                heapq.heappop(self._heap)
            return bool(entry[2])

    def _watch(self) -> None:
        with self._cond:
            while True:
                while self._heap and not self._heap[0][2][1]:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, entry = self._heap[0]
                now = time.monotonic()
                if now < deadline:
                    self._cond.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                entry[0].terminate, entry[2] = True, True


_DEADLINES = _Deadlines()


def _reason(exc: BaseException) -> str:
    """ORT's message, shortened: it can quote a whole node."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:400] + "..."


class OrtSession:
    """One ORT InferenceSession over a verified, self-contained model (bytes, never a path).

    ORT's `run` is thread-safe, so one session is shared. Every run has a deadline
    (`SessionOptions.run_deadline_s`); every ORT failure becomes a `BackendError` naming `name`."""

    def __init__(
        self,
        model: bytes,
        options: SessionOptions,
        name: str = "model",
        initializers: dict[str, np.ndarray] | None = None,
    ):
        import onnxruntime as ort

        if not isinstance(model, bytes):  # a path would let ORT open files by name
            raise TypeError("OrtSession takes the model's verified bytes, not a path")
        if options.device not in _PROVIDERS:
            raise UnsupportedError(
                f"device {options.device!r} not supported; choose from {sorted(_PROVIDERS)}"
            )
        wanted = _PROVIDERS[options.device]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise UnsupportedError(
                f"{wanted[0]} is not available in this onnxruntime build (have {available}); "
                "install 'mmedge[gpu]' for CUDA / TensorRT execution providers"
            )
        self.name = name
        self._deadline = options.run_deadline_s
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if options.threads:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not options.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # ORT copies these into the graph when it loads it (OrtApi::AddExternalInitializers); they
        # need to live only until the session exists, so the verified bytes are not held twice.
        held = dict(initializers or {})
        if held:
            so.add_external_initializers(
                list(held),
                [ort.OrtValue.ortvalue_from_numpy(a) for a in held.values()],
            )
        try:
            self._sess = ort.InferenceSession(
                model, sess_options=so, providers=[p for p in wanted if p in available]
            )
        except Exception as exc:  # ORT raises its own types (Fail, InvalidGraph, ...)
            raise BackendError(f"{name}: ONNX Runtime cannot load the graph: {_reason(exc)}") from None
        self.input_names = tuple(i.name for i in self._sess.get_inputs())
        self.output_names = tuple(o.name for o in self._sess.get_outputs())
        # fixed dims are ints, symbolic ones strings: how a caller tells a build's I/O contract apart
        self.output_shapes = {o.name: tuple(o.shape) for o in self._sess.get_outputs()}

    def call(self, run: Callable[[Any], Any]) -> Any:
        """Call `run(run_options)` under the run deadline (`SessionOptions.run_deadline_s`); ORT errors become typed ones."""
        import onnxruntime as ort

        run_options = ort.RunOptions()
        entry = _DEADLINES.start(run_options, self._deadline) if self._deadline is not None else None
        try:
            result = run(run_options)
        except Exception as exc:
            if entry is not None and _DEADLINES.finish(entry):
                raise DeadlineExceededError(
                    f"{self.name}: the run took longer than its {self._deadline:g} s deadline and was "
                    "cancelled (SessionOptions.run_deadline_s)"
                ) from None
            raise BackendError(f"{self.name}: ONNX Runtime failed to run the graph: {_reason(exc)}") from None
        if entry is not None:
            _DEADLINES.finish(entry)
        return result

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.call(lambda ro: self._sess.run(list(self.output_names), feeds, ro))
        return dict(zip(self.output_names, outs))

    def run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """IOBinding over the caller's numpy memory: the arrays are bound without a copy, so a KV
        cache bound here is read in place and outputs land directly in their buffers."""
        binding = self.binding()  # per call: bindings are not shared between threads
        binding.bind({k: np.ascontiguousarray(v) for k, v in feeds.items()}, outputs)
        binding.run()

    def device_cache(self, past: list[str], present: list[str], shape: tuple[int, ...]) -> None:
        """None: ONNX Runtime on the CPU reads the host cache, bound in place."""
        return None

    def binding(self) -> OrtBinding:
        """A reusable binding over host memory: what stays bound between calls (a KV cache) is bound once."""
        return OrtBinding(self)


class OrtBinding:
    """One caller's IOBinding over numpy memory, kept across calls, so that a KV cache is bound once
    rather than every token: rebinding a 30-layer cache every token cost about 10% of a decode step
    (measurements: docs/generation.md)."""

    def __init__(self, session: OrtSession):
        self._session, self._io = session, session._sess.io_binding()
        self._keep: dict[str, np.ndarray] = {}  # the bound arrays must outlive the binding

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """(Re)bind these names to these C-contiguous arrays; other names keep their binding."""
        for items, bind in ((inputs, self._io.bind_input), (outputs, self._io.bind_output)):
            for name, arr in items.items():
                if not arr.flags.c_contiguous:
                    raise UnsupportedError(f"buffer {name!r} must be C-contiguous")
                bind(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
                self._keep[name] = arr

    def run(self) -> None:
        sess = self._session._sess
        self._session.call(lambda ro: sess.run_with_iobinding(self._io, ro))


def ort_target(device: str = "cpu") -> str:
    """Engine-table key of ORT-optimized builds: they are only valid for this ORT version and provider."""
    import onnxruntime as ort

    return f"ort{ort.__version__}-{device}"


class OrtBackend:
    name = "ort"

    def has_build(
        self, package: Package, component: str, precision: str, variant: str, options: SessionOptions
    ) -> bool:
        built = package.manifest.engines.get(ort_target(options.device))
        return built is not None and build_key(component, precision, variant) in built.files

    def load(
        self, package: Package, component: str, precision: str, options: SessionOptions, variant: str = ""
    ) -> OrtSession:
        """Prefer an ORT-optimized build for this ORT version; ORT only ever gets verified bytes.

        `variant` names an extra build of the component (the LLM's "prefill" build,
        `builds.ort_prefill`); it exists only as an ORT build. A quantized precision without a build
        still runs (its Q/DQ graph), but slower than fp32 on CPU: that is worth a warning."""
        _, rel = component_file(package, component, precision)
        key = build_key(component, precision, variant)
        if self.has_build(package, component, precision, variant, options):
            rel = package.manifest.engines[ort_target(options.device)].files[key]
        elif variant:
            raise UnsupportedError(
                f"package {package.manifest.name!r} has no {key!r} build for {ort_target(options.device)}"
            )
        elif precision in ("int8", "int4"):
            warnings.warn(
                f"{package.manifest.name}: {component} runs its {precision} graph without an ORT build for "
                f"{ort_target(options.device)}, slower than fp32 on CPU; run `mmedge build {package.root}`",
                UnbuiltPrecisionWarning,
                stacklevel=4,
            )
        package.path(rel)  # listed, or an IntegrityError
        # The model and its external data are read here and hashed as they are read, so a file
        # swapped after verification is never run, and ORT gets bytes: given a path (or bytes
        # that still name external files) it would open files by name, relative to the current
        # directory, outside what was verified.
        verified = read_model(package.root, package.manifest, rel, check=not package.checked)
        return OrtSession(verified.model, options, name=key, initializers=verified.initializers)
