"""Bind a verified package's components to backend sessions; shared by every task pipeline.

Sessions are created lazily, once per component, and shared between threads (ONNX Runtime's
`run` is thread-safe). Inputs are checked against the manifest's dtypes and dim ranges.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.runtime.backends.base import Backend, Session, SessionOptions
from mmedge.runtime.images import ImageLimits, PreprocessConfig
from mmedge.runtime.manifest import ComponentEntry
from mmedge.runtime.package import Package, verify_package

if TYPE_CHECKING:
    from mmedge.runtime.texts import TextTokenizer

PRECISIONS = ("auto", "fp32", "fp16", "int8", "int4")
MAX_THREADS = 1024  # ORT takes an int32; a huge count would try to start that many threads
SAMPLE_TEXT = "a small red circle at the top left and a large blue square in the center"


def package_tokenizer(package: Package) -> TextTokenizer:
    """The package's text tokenizer, configured from its manifest."""
    from mmedge.runtime.texts import TextTokenizer

    t = package.manifest.tokenizer
    return TextTokenizer.from_file(
        package.path(t["file"]), context_length=int(t["context_length"]), pad_id=int(t["pad_id"])
    )


def sample_feeds(
    entry: ComponentEntry, batch: int, tokenizer: TextTokenizer | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic inputs of a realistic kind for benchmarks and build checks.

    `input_ids` is a tokenised sample caption (needs `tokenizer`), `attention_mask` all ones,
    `position_ids` 0..n-1, other floats standard normal noise, other integers zeros; symbolic
    dims take the manifest's `opt` values (or the tokenised length).
    """
    sizes = {d: r.opt for d, r in entry.dims.items()} | {"batch": batch}
    feeds: dict[str, np.ndarray] = {}
    for s in entry.inputs:
        if s.name == "input_ids":
            if tokenizer is None:
                raise InvalidInputError("sample inputs for a text component need the package tokenizer")
            ids, _ = tokenizer.encode_batch([SAMPLE_TEXT] * batch)
            feeds[s.name] = ids
            if isinstance(s.shape[1], str):
                sizes[s.shape[1]] = ids.shape[1]
    rng = np.random.default_rng(seed)
    for s in entry.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in s.shape)
        if s.name in feeds:
            continue
        if s.name == "attention_mask" or s.name == "logits_to_keep":
            feeds[s.name] = np.ones(shape, s.dtype)
        elif s.name == "position_ids":
            feeds[s.name] = np.broadcast_to(np.arange(shape[-1], dtype=s.dtype), shape).copy()
        elif s.dtype.startswith("float"):
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        else:
            feeds[s.name] = np.zeros(shape, s.dtype)
    return feeds


def make_backend(name: str) -> Backend:
    """Backend by name: 'ort' (default, everywhere) or 'tensorrt' (native engines)."""
    if name == "ort":
        from mmedge.runtime.backends.ort import OrtBackend

        return OrtBackend()
    if name == "tensorrt":
        from mmedge.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend()
    raise UnsupportedError(f"backend {name!r} is not supported; choose 'ort' or 'tensorrt'")


class ComponentRunner:
    """Sessions, tokenizer and preprocessing of one package, ready for a task pipeline."""

    def __init__(
        self,
        package: Package | str | Path,
        backend: str = "ort",
        precision: str = "auto",
        options: SessionOptions | None = None,
        image_limits: ImageLimits | None = None,
    ):
        if precision not in PRECISIONS:
            raise UnsupportedError(f"precision {precision!r} not in {PRECISIONS}")
        self.package = package if isinstance(package, Package) else verify_package(package)
        self.manifest = self.package.manifest
        self.backend = make_backend(backend)
        self.precision = precision
        self.options = options or SessionOptions()
        threads = self.options.threads
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
            raise InvalidInputError(
                f"threads must be an int in [0, {MAX_THREADS}] (0 = the backend's default), got {threads!r}"
            )
        self.image_limits = image_limits or ImageLimits()
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._tokenizer = None
        pre = self.manifest.preprocess
        self.preprocess = PreprocessConfig.from_dict(pre) if pre else None

    @property
    def tokenizer(self) -> TextTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = package_tokenizer(self.package)
            return self._tokenizer

    def precision_of(self, component: str) -> str:
        """The precision used for a component: the requested one, or for 'auto' the best built."""
        entry = self.manifest.component(component)
        if self.precision != "auto":
            if (
                self.precision not in entry.precisions
                and entry.calibration_data == "none"
                and len(entry.precisions) == 1
            ):
                return next(iter(entry.precisions))  # never quantized (e.g. a token-embedding lookup)
            if self.precision not in entry.precisions:
                raise UnsupportedError(
                    f"component {component!r} has no {self.precision} build (has {sorted(entry.precisions)}); "
                    f"run `mmedge calibrate` first or choose another precision"
                )
            return self.precision
        for p in ("int4", "int8", "fp16", "fp32"):
            if p in entry.precisions:
                return p
        return next(iter(entry.precisions))

    def session_options(self, component: str) -> SessionOptions:
        """The runner's options, adjusted to the component's role in a generation package: the
        token lookup runs on one thread; the image encoders, run once per request right before
        the LLM, do not keep their threads spinning; the LLM, run back to back while decoding, does."""
        if self.manifest.task not in ("chat", "generation"):
            return self.options
        if component == "embed":
            return replace(self.options, threads=1, spin=False)
        return replace(self.options, spin=component == "llm")

    def session(self, component: str) -> Session:
        with self._lock:
            if component not in self._sessions:
                self._sessions[component] = self.backend.load(
                    self.package, component, self.precision_of(component), self.session_options(component)
                )
            return self._sessions[component]

    def variant_session(self, component: str, variant: str) -> Session | None:
        """The ORT build `variant` of a component (the LLM's "prefill" build), or None where the
        package has none for this backend, precision and ORT version."""
        if self.backend.name != "ort":
            return None
        from mmedge.runtime.backends.ort import ort_target

        precision = self.precision_of(component)
        engines = self.manifest.engines.get(ort_target(self.options.device))
        key = f"{component}.{precision}.{variant}"
        if engines is None or key not in engines.files:
            return None
        # A prompt runs once before decoding: threads left spinning would take the decode build's cores.
        options = replace(self.session_options(component), spin=False)
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = self.backend.load(  # type: ignore[call-arg]  # ORT-only argument
                    self.package, component, precision, options, variant=variant
                )
            return self._sessions[key]

    def check_inputs(self, component: str, feeds: dict[str, np.ndarray]) -> ComponentEntry:
        """Dtype, rank, fixed dims and dim ranges of every input, as the manifest declares them."""
        entry = self.manifest.component(component)
        sizes: dict[str, int] = {}
        for spec in entry.inputs:
            if spec.name not in feeds:
                raise InvalidInputError(f"{component}: missing input {spec.name!r}")
            a = feeds[spec.name]
            if not isinstance(a, np.ndarray):
                raise InvalidInputError(
                    f"{component}.{spec.name}: expected a numpy array, got {type(a).__name__}"
                )
            if a.dtype != np.dtype(spec.dtype) or a.ndim != len(spec.shape):
                raise InvalidInputError(
                    f"{component}.{spec.name}: expected {spec.dtype} with {len(spec.shape)} dims, got {a.dtype} {a.shape}"
                )
            for dim, n in zip(spec.shape, a.shape):
                if isinstance(dim, int) and dim != n:
                    raise InvalidInputError(
                        f"{component}.{spec.name}: shape {a.shape} does not fit {spec.shape}"
                    )
                if isinstance(dim, str):
                    if sizes.setdefault(dim, n) != n:
                        raise InvalidInputError(
                            f"{component}: dim {dim!r} is {sizes[dim]} and {n} in different inputs"
                        )
                    r = entry.dims.get(dim)
                    if r is not None and dim != "batch" and not r.min <= n <= r.max:
                        raise InvalidInputError(
                            f"{component}.{spec.name}: {dim}={n} outside [{r.min}, {r.max}]"
                        )
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise InvalidInputError(f"{component}.{spec.name}: contains NaN or infinity")
            if spec.name == "input_ids" and a.size and self.manifest.tokenizer.get("file") is not None:
                # An id outside the vocabulary is an ORT error (too large) or a silent wrap-around (negative).
                vocab = self.tokenizer._tok.get_vocab_size(with_added_tokens=True)
                lo, hi = int(a.min()), int(a.max())
                if lo < 0 or hi >= vocab:
                    raise InvalidInputError(
                        f"{component}.input_ids: token ids must be in [0, {vocab}), got values in [{lo}, {hi}]"
                    )
        return entry

    def run_batched(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a component, splitting the batch into chunks no larger than the manifest's max batch."""
        entry = self.check_inputs(component, feeds)
        sess = self.session(component)
        n = next(iter(feeds.values())).shape[0]
        step = entry.dims["batch"].max if "batch" in entry.dims else n
        if n <= step:
            return sess.run(feeds)
        parts = [sess.run({k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
