"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when installed."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from mmedge.errors import IntegrityError, UnbuiltPrecisionWarning, UnsupportedError
from mmedge.runtime.backends.base import SessionOptions, build_key, component_file
from mmedge.runtime.package import Package

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OrtSession:
    """One ORT InferenceSession. ORT's `run` is thread-safe, so one session is shared."""

    def __init__(self, model: bytes | str, options: SessionOptions):
        import onnxruntime as ort

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
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if options.threads:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not options.spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._sess = ort.InferenceSession(
            model, sess_options=so, providers=[p for p in wanted if p in available]
        )
        self.input_names = tuple(i.name for i in self._sess.get_inputs())
        self.output_names = tuple(o.name for o in self._sess.get_outputs())
        # fixed dims are ints, symbolic ones strings: how a caller tells a build's I/O contract apart
        self.output_shapes = {o.name: tuple(o.shape) for o in self._sess.get_outputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._sess.run(list(self.output_names), feeds)
        return dict(zip(self.output_names, outs))

    def run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """IOBinding over the caller's numpy memory: the arrays are bound without a copy, so a KV
        cache bound here is read in place and outputs land directly in their buffers."""
        binding = self.binding()  # per call: bindings are not shared between threads
        binding.bind({k: np.ascontiguousarray(v) for k, v in feeds.items()}, outputs)
        binding.run()

    def binding(self) -> OrtBinding:
        """A reusable binding over host memory: what stays bound between calls (a KV cache) is bound once."""
        return OrtBinding(self._sess)


class OrtBinding:
    """One caller's IOBinding over numpy memory, kept across calls, so that a KV cache is bound once
    rather than every token: rebinding a 30-layer cache every token cost about 10% of a decode step
    (measurements: docs/generation.md)."""

    def __init__(self, sess: Any):
        self._sess, self._io = sess, sess.io_binding()
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
        self._sess.run_with_iobinding(self._io)


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
        """Prefer an ORT-optimized build for this ORT version; load verified bytes when self-contained.

        `variant` names an extra build of the component (the LLM's "prefill" build,
        `builds.ort_prefill`); it exists only as an ORT build. A quantized precision without a build
        still runs (its Q/DQ graph), but slower than fp32 on CPU: that is worth a warning."""
        import hashlib

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
        path = package.path(rel)
        if rel + ".data" in package.manifest.files:  # external data: ORT must read it from disk
            return OrtSession(str(path), options)
        data = path.read_bytes()
        # Hash again what ORT will run, so a file swapped after verification is never executed.
        if hashlib.sha256(data).hexdigest() != package.manifest.files[rel].sha256:
            raise IntegrityError(f"{rel} changed after the package was verified")
        return OrtSession(data, options)
