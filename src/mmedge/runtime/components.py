"""Bind a verified package's components to backend sessions; shared by every task pipeline.

Sessions are created lazily, once per component, and shared between threads (ONNX Runtime's
`run` is thread-safe). Components are found by role and paths are walked as the manifest's
`pipeline` section declares them; inputs are checked against the declared dtypes and dim ranges.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmedge.errors import IntegrityError, InvalidInputError, MemoryBudgetError, UnsupportedError
from mmedge.runtime.backends import DEFAULT_BACKEND, make_backend
from mmedge.runtime.backends.base import Session, SessionOptions
from mmedge.runtime.bundles import check_runner
from mmedge.runtime.images import ImageLimits
from mmedge.runtime.manifest import AUTO_ORDER, REQUEST_PRECISIONS, ComponentEntry
from mmedge.runtime.package import Package, open_package
from mmedge.runtime.sections import INSTRUCTION_SOURCES, PATH_SOURCES

if TYPE_CHECKING:
    from mmedge.runtime.signing import TrustPolicy
    from mmedge.runtime.texts import TextTokenizer

MAX_THREADS = 1024  # ORT takes an int32; a huge count would try to start that many threads
DEVICES = ("cpu", "cuda", "tensorrt")
MAX_RUN_DEADLINE_S = 86400.0  # a day; None turns the deadline off
# Roles whose graphs are never quantized (no weights to multiply): any requested precision runs them as they are.
ROLES_KEPT_IN_FP32 = ("token_embed",)


def package_tokenizer(package: Package, instruction: bool = False) -> TextTokenizer:
    """The package's text tokenizer (with `instruction`, the image path's instruction tokenizer),
    configured from its manifest."""
    from mmedge.runtime.texts import TextTokenizer

    t = package.manifest.instruction_tokenizer if instruction else package.manifest.tokenizer
    if t is None:
        what = "an instruction tokenizer" if instruction else "a tokenizer"
        raise UnsupportedError(f"package {package.manifest.name!r} has no {what}")
    # The bytes are hashed as they are read: a tokenizer.json swapped after verification is refused.
    return TextTokenizer.from_bytes(package.read_verified(t.file), t.context_length, t.pad_id)


class ComponentRunner:
    """Sessions, tokenizer and preprocessing of one package, ready for a task pipeline."""

    def __init__(
        self,
        package: Package | str | Path,
        backend: str = DEFAULT_BACKEND,
        precision: str = "auto",
        options: SessionOptions | None = None,
        image_limits: ImageLimits | None = None,
        trust: TrustPolicy | None = None,
        memory_budget_mb: float | None = None,
    ):
        """`trust` applies when `package` is a path (default: MMEDGE_TRUST, else hashes only).
        `memory_budget_mb` refuses (MemoryBudgetError), before anything loads, a package whose
        sessions would need more (`estimated_bytes`)."""
        if precision not in REQUEST_PRECISIONS:
            raise UnsupportedError(f"precision {precision!r} not in {REQUEST_PRECISIONS}")
        self.options = options or SessionOptions()
        threads = self.options.threads
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
            raise InvalidInputError(
                f"threads must be an int in [0, {MAX_THREADS}] (0 = the backend's default), got {threads!r}"
            )
        deadline = self.options.run_deadline_s
        if deadline is not None and (
            isinstance(deadline, bool)
            or not isinstance(deadline, (int, float))
            or not 0 < deadline <= MAX_RUN_DEADLINE_S
        ):
            raise InvalidInputError(
                f"run_deadline_s must be a number in (0, {MAX_RUN_DEADLINE_S:g}] seconds or None, got {deadline!r}"
            )
        if self.options.device not in DEVICES:
            raise UnsupportedError(
                f"device {self.options.device!r} is not supported; choose from {list(DEVICES)}"
            )
        self.backend = make_backend(backend)
        if isinstance(package, Package):
            self.package = package
        else:
            from mmedge.runtime.signing import trust_policy

            self.package = open_package(package, trust=trust or trust_policy())
        self.manifest = self.package.manifest
        check_runner(self.manifest, self.backend.name, self.options.device)
        self.precision = precision
        self.image_limits = image_limits or ImageLimits()
        self.preprocess = self.manifest.preprocess
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._tokenizer: TextTokenizer | None = None
        self._instruction_tokenizer: TextTokenizer | None = None
        if memory_budget_mb is not None:
            self._check_budget(memory_budget_mb)

    def _check_budget(self, budget_mb: float) -> None:
        if isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)) or not budget_mb > 0:
            raise InvalidInputError(f"memory_budget_mb must be a positive number, got {budget_mb!r}")
        need = self.estimated_bytes() / 2**20
        if need > budget_mb:
            raise MemoryBudgetError(
                f"package {self.manifest.name!r} at precision {self.precision!r} needs about {need:.0f} MB for "
                f"its sessions; the budget is {budget_mb:g} MB: pack it at a smaller precision (mmedge pack "
                "--precision int8 / int4), or raise the budget"
            )

    @property
    def tokenizer(self) -> TextTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = package_tokenizer(self.package)
            return self._tokenizer

    @property
    def instruction_tokenizer(self) -> TextTokenizer:
        """The tokenizer of the image path's instruction inputs (`Manifest.reads_instruction`)."""
        with self._lock:
            if self._instruction_tokenizer is None:
                self._instruction_tokenizer = package_tokenizer(self.package, instruction=True)
            return self._instruction_tokenizer

    def image_sources(self, pixels: np.ndarray, instruction: str | None = None) -> dict[str, np.ndarray]:
        """The image path's sources: the pixels and, when the path reads one, the instruction
        tokenised as HF's processors do (specials added; longer than its context is an error)."""
        if not self.manifest.reads_instruction():
            return {"pixel_values": pixels}
        if instruction is None:
            raise InvalidInputError(f"package {self.manifest.name!r} needs an instruction with each image")
        ids = np.array([self.instruction_tokenizer.encode(instruction, allow_empty=True)], np.int64)
        ids = np.repeat(ids, pixels.shape[0], axis=0)  # one instruction for every image of the batch
        return dict(zip(INSTRUCTION_SOURCES, (ids, np.ones_like(ids))), pixel_values=pixels)

    def role(self, role: str) -> str:
        """The component that plays `role` (an IntegrityError when the package has none)."""
        return self.manifest.by_role(role)

    def precision_of(self, component: str) -> str:
        """The precision used for a component: the requested one, or for 'auto' the best built."""
        entry = self.manifest.component(component)
        if self.precision != "auto":
            if self.precision not in entry.precisions and entry.role in ROLES_KEPT_IN_FP32:
                return next(iter(entry.precisions))  # a table lookup: nothing to quantize
            if self.precision not in entry.precisions:
                how = (
                    "run `mmedge calibrate` (int8 encoders, --weight-bits for an LLM)"
                    if self.precision in ("int8", "int4")
                    else "`mmedge calibrate PKG --fp16` writes fp16 graphs"
                )
                raise UnsupportedError(
                    f"component {component!r} has no {self.precision} precision (has {sorted(entry.precisions)}); "
                    f"{how}, or choose another precision"
                )
            return self.precision
        # fp16 graphs are for GPUs; on the CPU the fp32 graph runs faster
        order = [p for p in AUTO_ORDER if p != "fp16" or self.options.device != "cpu"]
        return next(p for p in order if p in entry.precisions)

    def session_options(self, component: str) -> SessionOptions:
        """The runner's options, adjusted to the component's role in a generating package: the
        token lookup runs on one thread; the image encoders, run once per request right before
        the LLM, do not keep their threads spinning; the LLM, run back to back while decoding, does."""
        if not self.manifest.has_role("llm_step"):
            return self.options
        role = self.manifest.component(component).role
        if role == "token_embed":
            return replace(self.options, threads=1, spin=False)
        return replace(self.options, spin=role == "llm_step")

    def session(self, component: str) -> Session:
        with self._lock:
            if component not in self._sessions:
                self._sessions[component] = self.backend.load(
                    self.package, component, self.precision_of(component), self.session_options(component)
                )
            return self._sessions[component]

    def preload(self, only: Sequence[str] = ()) -> None:
        """Load every component (and its variant builds), tokenizer and table now, each file checked
        as it loads: for a device that must fail at start-up rather than at its first call. `only`
        names paths ("image", "text") or components to load instead of everything: a camera loop
        that embeds images pays for its image path at start-up and for the text tower never."""
        if only:
            paths = self.manifest.pipeline.paths
            unknown = [n for n in only if n not in paths and n not in self.manifest.components]
            if unknown:
                raise InvalidInputError(
                    f"cannot preload {unknown}: package {self.manifest.name!r} has paths {sorted(paths)} "
                    f"and components {sorted(self.manifest.components)}"
                )
            for name in only:
                for component in [s.component for s in paths[name].steps] if name in paths else [name]:
                    self.session(component)
            return
        for name in self.manifest.components:
            self.session(name)
            self.variant_session(name, "prefill")
        if self.manifest.tokenizer is not None:
            _ = self.tokenizer
        if self.manifest.instruction_tokenizer is not None:
            _ = self.instruction_tokenizer
        tokens = self.manifest.pipeline.image_tokens
        if tokens is not None and tokens.newline is not None:
            self.package.read_verified(tokens.newline)

    def loaded(self) -> list[str]:
        """Sessions loaded so far ("<component>" or "<component>.<precision>.<variant>")."""
        with self._lock:
            return sorted(self._sessions)

    def release(self, component: str | None = None) -> list[str]:
        """Drop the sessions of `component` (its variant builds too), or of every component; they
        load again on next use. Returns what was released. A run in progress keeps its session
        until it ends (the caller's reference)."""
        with self._lock:
            names = [
                k
                for k in self._sessions
                if component is None or k == component or k.startswith(component + ".")
            ]
            for k in names:
                del self._sessions[k]
        return sorted(names)

    def estimated_bytes(self) -> int:
        """What this runner's sessions need, estimated from the files that load them: each graph's
        bytes (with the `.data` file of its weights, as bundles keep them) once for the backend's
        copy of its weights, and the largest once more for the verified bytes it is read into
        while it loads. ORT builds are about the size of the graph they were built from."""
        files = self.manifest.files
        sizes = []
        for name in self.manifest.components:
            rel = self.manifest.component(name).precisions[self.precision_of(name)].file
            sizes.append(files[rel].size + (files[rel + ".data"].size if rel + ".data" in files else 0))
        return sum(sizes) + max(sizes, default=0)

    def variant_session(self, component: str, variant: str) -> Session | None:
        """The build `variant` of a component (the LLM's "prefill" build), or None where the package
        has none for this backend, precision and version."""
        precision = self.precision_of(component)
        if not self.backend.has_build(self.package, component, precision, variant, self.options):
            return None
        key = f"{component}.{precision}.{variant}"
        # A prompt runs once before decoding: threads left spinning would take the decode build's cores.
        options = replace(self.session_options(component), spin=False)
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = self.backend.load(
                    self.package, component, precision, options, variant=variant
                )
            return self._sessions[key]

    def check_inputs(self, component: str, feeds: dict[str, np.ndarray]) -> ComponentEntry:
        """Dtype, rank, fixed dims and dim ranges of every input, as the manifest declares them."""
        return self._check_inputs(component, feeds)[0]

    def _check_inputs(
        self, component: str, feeds: dict[str, np.ndarray]
    ) -> tuple[ComponentEntry, dict[str, int]]:
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
            if spec.name == "input_ids" and spec.name in entry.int_ranges and a.size:
                # An id outside the table is an ORT error (too large) or a silent wrap-around (negative).
                # (Other declared ranges are sampling hints: a padded attention_mask holds zeros.)
                low, high = entry.int_ranges[spec.name]
                lo, hi = int(a.min()), int(a.max())
                if lo < low or hi >= high:
                    raise InvalidInputError(
                        f"{component}.{spec.name}: values must be in [{low}, {high}), got values in [{lo}, {hi}]"
                    )
        return entry, sizes

    def check_outputs(
        self, component: str, outs: dict[str, np.ndarray], sizes: dict[str, int] | None = None
    ) -> None:
        """Every declared output is there, with its dtype, rank, fixed dims and the sizes its
        symbolic dims took in the inputs (`sizes`), and holds finite numbers. A graph that breaks
        its manifest's contract is the package's fault: it must not reach the caller as a result
        (nor be blamed on the input later). One pass per output, no copies."""
        sizes = sizes or {}
        entry = self.manifest.component(component)
        for spec in entry.outputs:
            a = outs.get(spec.name)
            where = f"component {component!r} produced output {spec.name!r}"
            if not isinstance(a, np.ndarray):
                raise IntegrityError(f"component {component!r} did not produce its output {spec.name!r}")
            if a.dtype != np.dtype(spec.dtype) or a.ndim != len(spec.shape):
                raise IntegrityError(
                    f"{where} as {a.dtype} {a.shape}; its manifest declares {spec.dtype} {spec.shape}"
                )
            for dim, n in zip(spec.shape, a.shape):
                want = dim if isinstance(dim, int) else sizes.get(dim, n)
                if want != n:
                    raise IntegrityError(
                        f"{where} with shape {a.shape}; its manifest declares {spec.shape} "
                        f"({dim}={want} for these inputs)"
                    )
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise IntegrityError(f"{where} holding NaN or infinity; the package's graph is faulty")

    def run_batched(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a component, splitting the batch into chunks no larger than the manifest's max batch."""
        entry, sizes = self._check_inputs(component, feeds)
        sess = self.session(component)
        n = next(iter(feeds.values())).shape[0]
        step = entry.dims["batch"].max if "batch" in entry.dims else n
        if n <= step:
            outs = sess.run(feeds)
        else:
            parts = [sess.run({k: v[i : i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
            outs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        self.check_outputs(component, outs, sizes)
        return outs

    def run_path(self, path: str, sources: dict[str, np.ndarray]) -> np.ndarray:
        """Walk the declared path `path` ("image", "text") from its source arrays; return its output."""
        return self.run_path_values(path, sources)[self.manifest.pipeline.paths[path].output]

    def run_path_values(self, path: str, sources: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Walk the path; return every value it holds (sources and each step's outputs), e.g. the
        image features an ITM component reads beside the path's embedding."""
        declared = self.manifest.pipeline.paths.get(path)
        if declared is None:
            raise UnsupportedError(
                f"package {self.manifest.name!r} has no {path!r} path (task {self.manifest.task})"
            )
        values = dict(sources)
        needed = {v for step in declared.steps for v in step.inputs.values()} & set(PATH_SOURCES[path])
        if needed - set(values):
            raise InvalidInputError(f"the {path!r} path needs sources {sorted(needed - set(values))}")
        for step in declared.steps:
            outs = self.run_batched(step.component, {g: values[v] for g, v in step.inputs.items()})
            values.update({v: outs[g] for g, v in step.outputs.items()})
        return values

    def path_output(self, path: str) -> tuple[str, str]:
        """(component, graph output) that yields the path's result."""
        declared = self.manifest.pipeline.paths[path]
        for step in reversed(declared.steps):
            for graph_out, value in step.outputs.items():
                if value == declared.output:
                    return step.component, graph_out
        raise UnsupportedError(f"path {path!r} declares output {declared.output!r} that no step produces")
