"""The model package manifest: schema, strict parsing and serialisation (torch-free).

The manifest is the only contract between the host (export, calibration, build) and the device
runtime. Every part of it is a frozen dataclass (`sections` holds the task-level ones) parsed by
`schema.from_json`: unknown keys, wrong types, unsafe paths and sections that do not fit the task
are `IntegrityError`s, so a hand-edited or hostile manifest never reaches a backend half-understood.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from mmedge.errors import ConfigError, IntegrityError
from mmedge.runtime.backends import BACKENDS
from mmedge.runtime.diffusion_config import MAX_IMAGE_SIDE, MAX_LATENT_ELEMENTS, DiffusionConfig
from mmedge.runtime.modality_inputs import MODALITY_PATHS, ModalitiesConfig
from mmedge.runtime.schema import from_json, to_json
from mmedge.runtime.sections import (
    BOS,
    EOS,
    IMAGE,
    INSTRUCTION_SOURCES,
    PATH_SOURCES,
    ROLES,
    SHARED_ENCODER_PATHS,
    BundleConfig,
    ChatTemplate,
    ClassificationConfig,
    LLMConfig,
    PipelineConfig,
    PreprocessConfig,
    PromptConfig,
    RetrievalConfig,
    TokenizerConfig,
    markers,
    role_paths,
)

SCHEMA = "mmedge.package/2"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
TASKS = ("retrieval", "chat", "generation", "classification", "image_generation")
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
AUTO_ORDER = ("int4", "int8", "fp16", "fp32")  # precision="auto": the first a component has
REQUEST_PRECISIONS = ("auto", *PRECISIONS)  # what a caller may ask a runner for
# "images" / "texts": fed through their path; "none": weight-only. The further modalities' kinds
# are declared by their encoders; `mmedge calibrate` feeds them the synthetic scenes' paired data.
# "shared": a component on several paths (Meta-Transformer's encoder), calibrated on all of them.
CALIBRATION_DATA = (
    "images",
    "texts",
    "none",
    "audio",
    "depth",
    "thermal",
    "imu",
    "video",
    "points",
    "shared",
    "denoising",  # a denoiser's (and VAE decoder's) inputs, collected along denoising trajectories
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"[A-Za-z0-9_.:\-/]{1,200}")
MAX_DIM = 1 << 20  # a fixed dim or a dim range's max: every one sizes a buffer somewhere


def check_relpath(path: str, what: str = "path") -> str:
    """Accept only a normalised relative POSIX path that stays inside the package."""
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        raise IntegrityError(f"{what} {path!r} is not a relative POSIX path")
    p = PurePosixPath(path)
    if p.is_absolute() or any(part in ("..", ".", "") for part in path.split("/")):
        raise IntegrityError(f"{what} {path!r} must be relative and stay inside the package")
    return path


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise IntegrityError(f"{what}: {value!r} is not a valid name")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output; a shape entry is an int or a symbolic dim name."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        check_name(self.name, "tensor name")
        if self.dtype not in DTYPES:
            raise IntegrityError(f"tensor {self.name!r}: dtype {self.dtype!r} not in {DTYPES}")
        for d in self.shape:
            if isinstance(d, str):
                check_name(d, f"tensor {self.name!r} dim")
            elif not 0 <= d <= MAX_DIM:
                raise IntegrityError(f"tensor {self.name!r}: dim {d} is outside [0, {MAX_DIM}]")


@dataclass(frozen=True)
class DimRange:
    """Range of a symbolic dim; becomes a TensorRT optimization profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max <= MAX_DIM:
            raise IntegrityError(f"need 1 <= min <= opt <= max <= {MAX_DIM}, got {self}")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not _SHA256.match(self.sha256):
            raise IntegrityError(f"sha256 {self.sha256!r} is not a lowercase hex sha256")
        if self.size < 0:
            raise IntegrityError(f"size {self.size} is negative")


@dataclass(frozen=True)
class PrecisionEntry:
    """One precision of a component: its ONNX file and how good it measured (records)."""

    file: str
    parity: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_relpath(self.file, "precision file")


@dataclass(frozen=True)
class ComponentEntry:
    """One exported graph: its I/O contract, role, calibration data kind and precisions."""

    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange]
    precisions: dict[str, PrecisionEntry]
    calibration_data: str = "images"  # CALIBRATION_DATA
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # integer inputs: [low, high)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise IntegrityError(f"role {self.role!r} is not one this runtime knows: {sorted(ROLES)}")
        if self.calibration_data not in CALIBRATION_DATA:
            raise IntegrityError(f"calibration_data {self.calibration_data!r} not in {CALIBRATION_DATA}")
        if not self.precisions:
            raise IntegrityError("no precisions")
        unknown = sorted(set(self.precisions) - set(PRECISIONS))
        if unknown:
            raise IntegrityError(f"unknown precisions {unknown}; known: {list(PRECISIONS)}")
        for d in self.dims:
            check_name(d, "dim")
        names = {s.name for s in self.inputs}
        for name, (low, high) in self.int_ranges.items():
            if name not in names or not low < high:
                raise IntegrityError(f"int_ranges[{name!r}] = [{low}, {high}) does not fit an input")

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)


@dataclass(frozen=True)
class EngineEntry:
    """Backend-specific builds for one target, e.g. "sm87-trt10.3-<settings>" or "ort1.32-cpu".

    For TensorRT, `device` is the GPU compute capability; for ORT it is the execution provider.
    Builds are only valid for the exact backend `version` that produced them. `files` maps
    "<component>.<precision>" (and variants such as "<component>.<precision>.prefill") to paths.
    """

    backend: str
    version: str
    device: str
    settings: dict[str, Any]
    files: dict[str, str]

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise IntegrityError(f"backend {self.backend!r} is not one of {sorted(BACKENDS)}")
        for key, rel in self.files.items():
            check_name(key, "engine file key")
            check_relpath(rel, f"engine file {key}")


@dataclass(frozen=True)
class Provenance:
    """Where a package came from; `source` and `config` are records the runtime never interprets."""

    mmedge: str
    torch: str
    onnx: str
    opset: int
    created: str
    source: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """A package's manifest. `family`/`variant` name the architecture, `task` the pipeline kind."""

    name: str
    family: str
    variant: str
    task: Literal["retrieval", "chat", "generation", "classification", "image_generation"]
    provenance: Provenance
    files: dict[str, FileEntry]
    components: dict[str, ComponentEntry]
    pipeline: PipelineConfig
    preprocess: PreprocessConfig | None = None
    tokenizer: TokenizerConfig | None = None
    instruction_tokenizer: TokenizerConfig | None = None  # the image path's instruction inputs
    llm: LLMConfig | None = None
    prompt: PromptConfig | None = None
    retrieval: RetrievalConfig | None = None
    modalities: ModalitiesConfig | None = None  # preprocessing of the audio, depth, thermal, imu paths
    classification: ClassificationConfig | None = None  # class labels of each classification path
    diffusion: DiffusionConfig | None = None  # scheduler and latent geometry (image_generation)
    chat_template: ChatTemplate | None = None
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    bundle: BundleConfig | None = None  # set in a device bundle (`mmedge pack`)
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("family", self.family), ("variant", self.variant)):
            check_name(value, what)
        for rel in self.files:
            check_relpath(rel, "files key")
        for name in (*self.components, *self.engines):
            check_name(name, "component or engine target")
        _check_wiring(self)

    def to_json(self) -> str:
        """Serialise deterministically (sorted keys) so hashes of manifests are stable."""
        return json.dumps(to_json(self), indent=2, sort_keys=True) + "\n"

    def component(self, name: str) -> ComponentEntry:
        """Return one component or raise an error listing the ones that exist."""
        try:
            return self.components[name]
        except KeyError:
            raise IntegrityError(
                f"package {self.name!r} has no component {name!r}; it has {sorted(self.components)}"
            ) from None

    def by_role(self, role: str) -> str:
        """The name of the one component with `role`; an IntegrityError when there is none."""
        found = [n for n, c in self.components.items() if c.role == role]
        if len(found) != 1:
            have = {n: c.role for n, c in self.components.items()}
            raise IntegrityError(f"package {self.name!r} needs one {role!r} component; its roles are {have}")
        return found[0]

    def has_role(self, role: str) -> bool:
        return any(c.role == role for c in self.components.values())

    def reads_instruction(self) -> bool:
        """Whether the image path reads the user's instruction (`sections.INSTRUCTION_SOURCES`)."""
        path = self.pipeline.paths.get("image")
        return path is not None and any(
            v in INSTRUCTION_SOURCES for step in path.steps for v in step.inputs.values()
        )


# What each task needs. A package that lacks any of it is refused when opened, not on first use.
_TASK_NEEDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # task: (paths, roles, sections)
    "retrieval": (("image", "text"), (), ("preprocess", "tokenizer", "retrieval")),
    "chat": (("image",), ("token_embed", "llm_step"), ("preprocess", "tokenizer", "llm")),
    "generation": ((), ("token_embed", "llm_step"), ("tokenizer", "llm", "prompt")),
    # per-modality paths ending in a task head (Meta-Transformer): any of `_TASK_OPTIONAL_PATHS`, one at least
    "classification": ((), (), ("classification",)),
    # prompt -> text path -> conditioning; the denoiser runs in a scheduler's loop, a VAE decodes latents
    "image_generation": (("text",), ("denoiser",), ("tokenizer", "diffusion")),
}
# Paths a task may have without needing each: a classification package has those of its modalities,
# a retrieval package may embed further modalities beside images and text (ImageBind).
_TASK_OPTIONAL_PATHS: dict[str, tuple[str, ...]] = {
    "classification": SHARED_ENCODER_PATHS,
    "retrieval": ("audio", "depth", "thermal", "imu", "video"),
}


# Roles a task may use without needing them: a retrieval package's re-ranker; a chat decoder's
# cross-attention keys/values (and the question encoder they are computed from).
_TASK_OPTIONAL_ROLES: dict[str, tuple[str, ...]] = {
    "retrieval": ("itm",),
    "chat": ("cross_kv", "question_encoder"),
    # none: a pixel-space denoiser; the encoder serves image-to-image only
    "image_generation": ("vae_decoder", "vae_encoder"),
}
CROSS_PREFIX = "cross_key_values."


def _check_wiring(m: Manifest) -> None:
    """Roles, paths and sections fit together and fit the task."""
    paths, roles, sections = _TASK_NEEDS[m.task]
    optional = _TASK_OPTIONAL_ROLES.get(m.task, ())
    usable = paths + _TASK_OPTIONAL_PATHS.get(m.task, ())
    for name, component in m.components.items():
        if not set(role_paths(component.role)) & set(usable) and component.role not in roles + optional:
            raise IntegrityError(
                f"component {name!r}: a {m.task} package has no use for a {component.role!r} component"
            )
    for section in sections:
        if getattr(m, section) is None:
            raise IntegrityError(f"a {m.task} package needs a {section!r} section")
    for role in roles:
        m.by_role(role)
    for needed in paths:
        if needed not in m.pipeline.paths:
            raise IntegrityError(f"a {m.task} package needs a pipeline path {needed!r}")
    if not m.pipeline.paths and m.task in _TASK_OPTIONAL_PATHS:
        raise IntegrityError(
            f"a {m.task} package needs one of the paths {list(_TASK_OPTIONAL_PATHS[m.task])}"
        )
    for path_name, path in m.pipeline.paths.items():
        values = set(PATH_SOURCES[path_name])
        for i, step in enumerate(path.steps):
            where = f"pipeline.paths.{path_name}.steps[{i}]"
            entry = m.components.get(step.component)
            if entry is None:
                raise IntegrityError(f"{where} names component {step.component!r}, which the package lacks")
            if path_name not in role_paths(entry.role):
                raise IntegrityError(
                    f"{where}: a {entry.role!r} component does not run on the {path_name!r} path"
                )
            if set(step.inputs) != {s.name for s in entry.inputs}:
                raise IntegrityError(
                    f"{where} binds inputs {sorted(step.inputs)}; the graph has {[s.name for s in entry.inputs]}"
                )
            if not set(step.outputs) <= {s.name for s in entry.outputs}:
                raise IntegrityError(f"{where} binds outputs the graph lacks: {sorted(step.outputs)}")
            missing = sorted(set(step.inputs.values()) - values)
            if missing:
                raise IntegrityError(f"{where} reads values {missing} that no earlier step produces")
            values |= set(step.outputs.values())
        if path.output not in values:
            raise IntegrityError(
                f"pipeline.paths.{path_name}.output {path.output!r} is not produced by the path"
            )
    configured = m.modalities.present() if m.modalities is not None else ()
    for modality in MODALITY_PATHS:
        if (modality in m.pipeline.paths) != (modality in configured):
            raise IntegrityError(
                f"a {modality!r} path and a modalities.{modality} section (its preprocessing) go together"
            )
    if m.classification is not None:
        _check_classification(m, m.classification)
    if m.has_role("itm"):
        _check_itm(m)
    if m.reads_instruction() != (m.instruction_tokenizer is not None):
        raise IntegrityError(
            "an image path that reads an instruction needs an 'instruction_tokenizer' section, "
            "and that section is only for such a path"
        )
    if m.chat_template is not None and (m.prompt is not None or m.task != "chat"):
        raise IntegrityError("a chat_template section belongs to a chat package without a 'prompt' section")
    if m.task == "chat" and m.prompt is None and m.chat_template is None:
        raise IntegrityError("a chat package needs a 'prompt' or a 'chat_template' section")
    cross = m.has_role("cross_kv")
    if m.task == "chat" and cross:
        # the image enters through cross-attention: it takes no LLM positions
        if m.pipeline.image_tokens is not None or m.prompt is None:
            raise IntegrityError(
                "a chat package whose decoder cross-attends to the image needs a 'prompt' section and no "
                "pipeline.image_tokens"
            )
        for name in ("first_turn", "turn", "caption"):
            if IMAGE in markers(getattr(m.prompt, name) or ""):
                raise IntegrityError(
                    f"prompt.{name} holds {IMAGE}, but the decoder reads the image by cross-attention"
                )
    elif m.task == "chat" and m.pipeline.image_tokens is None:
        raise IntegrityError("a chat package needs pipeline.image_tokens")
    elif m.task == "chat" and m.prompt is not None:
        for name in ("first_turn", "caption"):
            text = getattr(m.prompt, name)
            if text is None or markers(text).count(IMAGE) != 1:
                raise IntegrityError(f"a chat package's prompt.{name} must hold {IMAGE} exactly once")
    elif m.prompt is not None and IMAGE in markers(m.prompt.first_turn + m.prompt.turn):
        raise IntegrityError(f"a {m.task} package has no image path for the {IMAGE} in its prompt")
    if m.llm is not None and m.has_role("llm_step"):
        _check_llm_step(m, m.llm, m.component(m.by_role("llm_step")))
    if m.has_role("question_encoder"):
        _check_question_encoder(m)
    if (m.diffusion is not None) != (m.task == "image_generation"):
        raise IntegrityError("a diffusion section goes with an image_generation package, and only there")
    if m.diffusion is not None:
        _check_diffusion(m, m.diffusion)
    if m.prompt is not None and m.llm is None and {BOS, EOS} & set(markers(m.prompt.first_turn)):
        raise IntegrityError("prompt markers {bos}/{eos} need an 'llm' section for their ids")


def _path_output_spec(m: Manifest, path: str) -> TensorSpec | None:
    """The graph output spec of the value a (checked) path yields, from the last step that names
    it; None when the path yields one of its sources."""
    declared = m.pipeline.paths[path]
    return next(
        (
            spec
            for step in reversed(declared.steps)
            for graph_out, value in step.outputs.items()
            if value == declared.output
            for spec in m.component(step.component).outputs
            if spec.name == graph_out
        ),
        None,
    )


def _check_classification(m: Manifest, section: ClassificationConfig) -> None:
    """The labels belong to a classification package, one list per path, each as long as the
    path's logits' last dim (a fixed class count)."""
    if m.task != "classification":
        raise IntegrityError(
            f"a classification section belongs to a classification package, not a {m.task} one"
        )
    paths = sorted(m.pipeline.paths)
    if sorted(section.labels) != paths:
        raise IntegrityError(
            f"classification.labels covers paths {sorted(section.labels)}; the package's paths are {paths}"
        )
    for path, names in section.labels.items():
        spec = _path_output_spec(m, path)
        if spec is None or len(spec.shape) != 2 or not isinstance(spec.shape[1], int):
            what = "a source" if spec is None else f"{spec.name!r} {spec.shape}"
            raise IntegrityError(
                f"the {path!r} path yields {what}; a classification path yields (batch, classes) logits "
                "with a fixed class count"
            )
        classes = spec.shape[1]
        if len(names) != classes:
            raise IntegrityError(
                f"classification.labels[{path!r}] has {len(names)} labels; the path's {spec.name!r} has "
                f"{classes} classes"
            )


def _check_itm(m: Manifest) -> None:
    """One ITM component, reading text-path sources and values the image path produces (bound by
    name, with the same shape), and giving one (no match, match) logit pair per row."""
    name = m.by_role("itm")
    entry = m.component(name)
    image = m.pipeline.paths["image"]
    produced = {
        value: spec
        for step in image.steps
        for graph_out, value in step.outputs.items()
        for spec in m.component(step.component).outputs
        if spec.name == graph_out
    }
    for spec in entry.inputs:
        if spec.name in PATH_SOURCES["text"]:
            continue
        source = produced.get(spec.name)
        if source is None or source.shape != spec.shape or source.dtype != spec.dtype:
            raise IntegrityError(
                f"itm component {name!r} input {spec.name!r} {spec.shape} is neither a text source nor an "
                f"image path value of that shape; the image path yields {sorted(produced)}"
            )
    if len(entry.outputs) != 1 or entry.outputs[0].shape[-1:] != (2,):
        raise IntegrityError(f"itm component {name!r} must give one output of (no match, match) logits")


def _check_llm_step(m: Manifest, llm: LLMConfig, step: ComponentEntry) -> None:
    """The `llm` section's cache geometry is the llm_step graph's: one past key and value per
    layer, each (batch, kv_heads, slots, head_dim), and logits over the vocabulary. The runtime
    allocates the cache from the section, so a section that disagrees would size it freely."""
    past = [s for s in step.inputs if s.name.startswith("past_key_values.")]
    if len(past) != 2 * llm.layers:
        raise IntegrityError(
            f"llm.layers is {llm.layers} but the llm_step graph takes {len(past)} past key/value inputs"
        )
    for spec in past:
        if len(spec.shape) != 4 or spec.shape[1:] != (llm.kv_heads, llm.max_context, llm.head_dim):
            raise IntegrityError(
                f"llm_step input {spec.name!r} {spec.shape} does not fit llm kv_heads={llm.kv_heads}, "
                f"max_context={llm.max_context}, head_dim={llm.head_dim}"
            )
    logits = next((s for s in step.outputs if s.name == "logits"), None)
    if logits is None or logits.shape[-1:] != (llm.vocab_size,):
        raise IntegrityError(f"the llm_step graph's logits must end in llm.vocab_size={llm.vocab_size}")
    _check_cross(m, llm, step)


def _image_values(m: Manifest) -> dict[str, TensorSpec]:
    """The values the image path produces, by name, with their graphs' specs."""
    image = m.pipeline.paths.get("image")
    return {
        value: spec
        for step in (image.steps if image is not None else ())
        for graph_out, value in step.outputs.items()
        for spec in m.component(step.component).outputs
        if spec.name == graph_out
    }


def _check_question_encoder(m: Manifest) -> None:
    """One question encoder beside a cross_kv component: text-path sources and image path values
    in (bound by name, same shape), one output of per-token states."""
    name = m.by_role("question_encoder")
    entry, produced = m.component(name), _image_values(m)
    if not m.has_role("cross_kv") or len(entry.outputs) != 1:
        raise IntegrityError(f"question_encoder {name!r} must give one output, read by a cross_kv component")
    for spec in entry.inputs:
        if spec.name in PATH_SOURCES["text"]:
            continue
        source = produced.get(spec.name)
        if source is None or source.shape != spec.shape or source.dtype != spec.dtype:
            raise IntegrityError(
                f"question_encoder {name!r} input {spec.name!r} {spec.shape} is neither a text source nor an "
                f"image path value of that shape; the image path yields {sorted(produced)}"
            )


def _check_cross(m: Manifest, llm: LLMConfig, step: ComponentEntry) -> None:
    """The cross keys/values: one cross_kv component whose outputs are exactly the llm_step's
    `cross_key_values.*` inputs (a key and a value per layer, (1, kv_heads, memory, head_dim):
    computed once and shared by every row of a step), reading one value that the runtime has: the
    image path's (captioning) or the question encoder's output (VQA), of the same trailing shape."""
    inputs = [s for s in step.inputs if s.name.startswith(CROSS_PREFIX)]
    if not m.has_role("cross_kv"):
        if inputs:
            raise IntegrityError(
                "the llm_step graph takes cross_key_values.* inputs but no cross_kv component gives them"
            )
        return
    name = m.by_role("cross_kv")
    entry = m.component(name)
    if len(inputs) != 2 * llm.layers:
        raise IntegrityError(
            f"llm.layers is {llm.layers} but the llm_step graph takes {len(inputs)} cross key/value inputs"
        )
    for spec in inputs:
        if (
            len(spec.shape) != 4
            or spec.shape[0] != 1
            or (spec.shape[1], spec.shape[3]) != (llm.kv_heads, llm.head_dim)
        ):
            raise IntegrityError(
                f"llm_step input {spec.name!r} {spec.shape} is not (1, kv_heads={llm.kv_heads}, memory, "
                f"head_dim={llm.head_dim})"
            )
    if {(s.name, s.dtype, s.shape) for s in entry.outputs} != {(s.name, s.dtype, s.shape) for s in inputs}:
        raise IntegrityError(
            f"cross_kv {name!r} outputs are not the llm_step graph's cross_key_values.* inputs"
        )
    available = dict(_image_values(m))
    if m.has_role("question_encoder"):
        available = {s.name: s for s in m.component(m.by_role("question_encoder")).outputs}
    if len(entry.inputs) != 1:
        raise IntegrityError(f"cross_kv {name!r} must read one value")
    spec = entry.inputs[0]
    source = available.get(spec.name)
    if (
        source is None
        or source.dtype != spec.dtype
        or not _fits(source.shape[1:], spec.shape[1:])
        or spec.shape[0] != 1
    ):
        raise IntegrityError(
            f"cross_kv {name!r} input {spec.name!r} {spec.shape} is not one row of a value the runtime has: "
            f"{sorted(available)}"
        )


def _fits(a: tuple[int | str, ...], b: tuple[int | str, ...]) -> bool:
    """Same rank, and the same size wherever both dims are fixed."""
    return len(a) == len(b) and all(x == y for x, y in zip(a, b) if isinstance(x, int) and isinstance(y, int))


def _check_references(m: Manifest) -> None:
    """Every file a component, engine or the tokenizer names must be listed (hashed) in `files`."""
    named = [p.file for c in m.components.values() for p in c.precisions.values()]
    named += [f for e in m.engines.values() for f in e.files.values()]
    for what, tok in (("tokenizer", m.tokenizer), ("instruction_tokenizer", m.instruction_tokenizer)):
        if tok is not None:
            named.append(check_relpath(tok.file, f"{what}.file"))
    tokens = m.pipeline.image_tokens
    if tokens is not None and tokens.newline is not None:
        named.append(check_relpath(tokens.newline, "pipeline.image_tokens.newline"))
    for path in named:
        if path not in m.files:
            raise IntegrityError(f"manifest names {path!r} but does not list its hash in 'files'")


def _no_constant(name: str) -> Any:
    """JSON's NaN / Infinity extensions: no manifest number may be non-finite, records included."""
    raise ValueError(f"non-finite number {name} is not allowed")


def parse_manifest(text: str | bytes) -> Manifest:
    """Parse and validate manifest JSON; any deviation from the schema is an IntegrityError."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"manifest is {len(text)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        raw = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise IntegrityError(f"manifest root: expected an object, got {type(raw).__name__}")
    schema = raw.get("schema")
    if schema != SCHEMA:
        hint = ""
        if schema == "mmedge.package/1":
            src = (
                (raw.get("provenance") or {}).get("source")
                if isinstance(raw.get("provenance"), dict)
                else None
            )
            where = f" from {src.get('path')!r}" if isinstance(src, dict) and src.get("path") else ""
            hint = (
                f"; re-export it{where} with `mmedge export SRC --out PKG` (then calibrate and build again)"
            )
        raise IntegrityError(f"manifest schema {schema!r} is not supported; expected {SCHEMA!r}{hint}")
    try:
        manifest = from_json(Manifest, raw, "manifest")
    except ConfigError as exc:  # a section's own checks
        raise IntegrityError(f"manifest: {exc}") from None
    except RecursionError:
        raise IntegrityError("manifest is nested too deeply") from None
    _check_references(manifest)  # writers hash files last, so this holds only for a written manifest
    return manifest


def _check_diffusion(m: Manifest, section: DiffusionConfig) -> None:
    """The denoiser takes float32 (sample, timestep, encoder_hidden_states) and gives `out_sample` of
    the sample's shape, with the section's latent channels, a latent range holding the default size
    within the allocation caps, conditioning of the text path's shape and a batch for guidance's two
    rows; a VAE decoder reads such latents and gives one RGB `sample` (a pixel-space denoiser's latents
    are RGB themselves). The runtime sizes its buffers from these, so a section that disagrees with
    the graphs is refused here, not in the middle of a call."""
    name = m.by_role("denoiser")
    entry = m.component(name)
    specs = {s.name: s for s in entry.inputs}
    latents = ("batch", section.latent_channels, "height", "width")
    out = next((s for s in entry.outputs if s.name == "out_sample"), None)
    if sorted(specs) != ["encoder_hidden_states", "sample", "timestep"] or out is None:
        raise IntegrityError(
            f"denoiser {name!r} must take sample, timestep and encoder_hidden_states and give out_sample"
        )
    if specs["sample"].shape != latents or out.shape != latents or specs["timestep"].shape != ("batch",):
        raise IntegrityError(
            f"denoiser {name!r}: sample and out_sample must be {latents} and timestep (batch,)"
        )
    cond = _path_output_spec(m, "text")
    if cond is None or cond.shape[1:] != specs["encoder_hidden_states"].shape[1:]:
        raise IntegrityError(
            f"denoiser {name!r} reads encoder_hidden_states {specs['encoder_hidden_states'].shape}; the text "
            f"path yields {cond.shape if cond else 'a source'}"
        )
    if any(s.dtype != "float32" for s in (*specs.values(), out, cond)):
        raise IntegrityError(
            f"denoiser {name!r}: its inputs, its output and the conditioning must be float32"
        )
    text_length = fixed_text_length(m)
    if m.tokenizer is None or text_length != m.tokenizer.context_length:
        raise IntegrityError(
            f"the text path's graph takes {text_length} tokens; an image_generation package pads every prompt "
            "to tokenizer.context_length, so the two must be one fixed length"
        )
    dims = entry.dims
    for dim in ("batch", "height", "width"):
        if dim not in dims:
            raise IntegrityError(f"denoiser {name!r} declares no range for {dim!r}")
    if dims["batch"].max < 2:
        raise IntegrityError(
            f"denoiser {name!r}: classifier-free guidance runs 2 rows; its batch max is below"
        )
    h, w = dims["height"], dims["width"]
    for dim, r in (("height", h), ("width", w)):
        if r.min % section.latent_multiple or r.max % section.latent_multiple:
            raise IntegrityError(
                f"denoiser {name!r}: the {dim} range [{r.min}, {r.max}] is not in multiples of "
                f"diffusion.latent_multiple={section.latent_multiple}"
            )
        if not r.min <= section.sample_size <= r.max:
            raise IntegrityError(
                f"diffusion.sample_size {section.sample_size} is outside the denoiser's {dim} range"
            )
    if section.latent_channels * h.max * w.max > MAX_LATENT_ELEMENTS or (
        max(h.max, w.max) * section.vae_scale_factor > MAX_IMAGE_SIDE
    ):
        raise IntegrityError(
            f"denoiser {name!r}: latents up to {h.max} x {w.max} exceed the caps of {MAX_LATENT_ELEMENTS} elements "
            f"and {MAX_IMAGE_SIDE}-pixel images"
        )
    if m.has_role("vae_decoder"):
        decoder = m.component(m.by_role("vae_decoder"))
        outputs = [(s.name, s.dtype, s.shape[:2]) for s in decoder.outputs]
        if [(s.name, s.dtype, s.shape) for s in decoder.inputs] != [
            ("latent_sample", "float32", latents)
        ] or (outputs != [("sample", "float32", ("batch", 3))] or len(decoder.outputs[0].shape) != 4):
            raise IntegrityError(
                f"the vae_decoder must take one float32 latent_sample {latents} and give one float32 sample "
                "(batch, 3, H, W)"
            )
        for dim, r in (("height", h), ("width", w)):
            got = decoder.dims.get(dim)
            if got is None or got.min > r.min or got.max < r.max:
                raise IntegrityError(
                    f"the vae_decoder's {dim} range must cover the denoiser's [{r.min}, {r.max}]"
                )
        if m.has_role("vae_encoder"):
            encoder = m.component(m.by_role("vae_encoder"))
            inputs = [(s.name, s.dtype, s.shape[:2], len(s.shape)) for s in encoder.inputs]
            if inputs != [("sample", "float32", ("batch", 3), 4)] or [
                (s.name, s.dtype, s.shape[:2], len(s.shape)) for s in encoder.outputs
            ] != [("latent", "float32", ("batch", section.latent_channels), 4)]:
                raise IntegrityError(
                    "the vae_encoder must take one float32 sample (batch, 3, H, W) and give one float32 "
                    f"latent (batch, {section.latent_channels}, h, w)"
                )
    elif section.vae_scale_factor != 1 or section.latent_channels != 3:
        raise IntegrityError(
            "a package without a vae_decoder works in pixel space: vae_scale_factor 1 and 3 latent channels"
        )
    elif m.has_role("vae_encoder"):
        raise IntegrityError("a vae_encoder needs the vae_decoder of a latent model")


def fixed_text_length(m: Manifest) -> int | None:
    """The token count the text path's graph takes when it is fixed (None: any length)."""
    path = m.pipeline.paths.get("text")
    for step in path.steps if path is not None else ():
        spec = m.component(step.component).input("input_ids")
        if spec is not None and isinstance(spec.shape[-1], int):
            return spec.shape[-1]
    return None
