"""The model package manifest: schema, strict parsing and serialisation (torch-free).

The manifest is the only contract between the host (export, calibration, build) and the
device runtime. Parsing is strict: unknown keys, wrong types and unsafe paths are errors,
so a hand-edited or hostile manifest never reaches a backend half-understood.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

from mmedge.errors import IntegrityError

SCHEMA = "mmedge.package/1"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
TASKS = ("retrieval", "chat", "generation", "embedding")
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output; a shape entry is an int or a symbolic dim name."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class DimRange:
    """Range of a symbolic dim; becomes a TensorRT optimization profile."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class PrecisionEntry:
    """One built precision of a component: its ONNX file and how good it measured."""

    file: str
    parity: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentEntry:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange]
    precisions: dict[str, PrecisionEntry]
    calibration_data: str = "images"


@dataclass(frozen=True)
class EngineEntry:
    """Backend-specific builds for one target, e.g. "sm87-trt10.3-<settings>" or "ort1.32-cpu".

    For TensorRT, `device` is the GPU compute capability; for ORT it is the execution provider.
    Builds are only valid for the exact backend `version` that produced them.
    """

    backend: str  # "tensorrt" | "ort"
    version: str
    device: str
    settings: dict[str, Any]
    files: dict[str, str]  # "<component>.<precision>" -> package-relative path


@dataclass(frozen=True)
class Manifest:
    name: str
    family: str
    task: str
    provenance: dict[str, Any]
    preprocess: dict[str, Any]
    tokenizer: dict[str, Any]
    generation: dict[str, Any]
    files: dict[str, FileEntry]
    components: dict[str, ComponentEntry]
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    schema: str = SCHEMA

    def to_json(self) -> str:
        """Serialise deterministically (sorted keys) so hashes of manifests are stable."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def component(self, name: str) -> ComponentEntry:
        """Return one component or raise an error listing the ones that exist."""
        try:
            return self.components[name]
        except KeyError:
            raise IntegrityError(
                f"package {self.name!r} has no component {name!r}; it has {sorted(self.components)}"
            ) from None


# --- strict parsing -------------------------------------------------------------------


def check_relpath(path: str, what: str = "path") -> str:
    """Accept only a normalised relative POSIX path that stays inside the package."""
    if not isinstance(path, str) or not path or "\x00" in path or "\\" in path:
        raise IntegrityError(f"{what} {path!r} is not a relative POSIX path")
    p = PurePosixPath(path)
    if p.is_absolute() or any(part in ("..", ".", "") for part in path.split("/")):
        raise IntegrityError(f"{what} {path!r} must be relative and stay inside the package")
    return path


def _obj(value: Any, where: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise IntegrityError(f"manifest {where}: expected an object, got {type(value).__name__}")
    unknown = set(value) - required - set(optional)
    if unknown:
        raise IntegrityError(f"manifest {where}: unknown keys {sorted(unknown)}")
    missing = required - set(value)
    if missing:
        raise IntegrityError(f"manifest {where}: missing keys {sorted(missing)}")
    return value


def _typed(value: Any, typ: type | tuple[type, ...], where: str) -> Any:
    # bool is an int subclass; never accept it where a number is meant.
    if isinstance(value, bool) and typ in (int, (int, float)):
        raise IntegrityError(f"manifest {where}: expected {typ}, got bool")
    if not isinstance(value, typ):
        raise IntegrityError(f"manifest {where}: expected {typ}, got {type(value).__name__}")
    return value


def _name(value: Any, where: str) -> str:
    _typed(value, str, where)
    if not re.fullmatch(r"[A-Za-z0-9_.:\-/]{1,200}", value):
        raise IntegrityError(f"manifest {where}: {value!r} is not a valid name")
    return value


def _tensor(value: Any, where: str) -> TensorSpec:
    v = _obj(value, where, {"name", "dtype", "shape"})
    dtype = _typed(v["dtype"], str, f"{where}.dtype")
    if dtype not in DTYPES:
        raise IntegrityError(f"manifest {where}.dtype: {dtype!r} not in {DTYPES}")
    shape = _typed(v["shape"], list, f"{where}.shape")
    dims: list[int | str] = []
    for i, d in enumerate(shape):
        if isinstance(d, str):
            dims.append(_name(d, f"{where}.shape[{i}]"))
        else:
            dims.append(_typed(d, int, f"{where}.shape[{i}]"))
    return TensorSpec(_name(v["name"], f"{where}.name"), dtype, tuple(dims))


def _dim(value: Any, where: str) -> DimRange:
    v = _obj(value, where, {"min", "opt", "max"})
    r = DimRange(*(_typed(v[k], int, f"{where}.{k}") for k in ("min", "opt", "max")))
    if not 1 <= r.min <= r.opt <= r.max:
        raise IntegrityError(f"manifest {where}: need 1 <= min <= opt <= max, got {r}")
    return r


def _component(value: Any, where: str) -> ComponentEntry:
    v = _obj(value, where, {"inputs", "outputs", "dims", "precisions"}, {"calibration_data"})
    precisions = {}
    for p, e in _typed(v["precisions"], dict, f"{where}.precisions").items():
        pe = _obj(e, f"{where}.precisions.{p}", {"file"}, {"parity", "calibration"})
        precisions[_name(p, f"{where}.precisions")] = PrecisionEntry(
            check_relpath(pe["file"], f"{where}.precisions.{p}.file"),
            _typed(pe.get("parity", {}), dict, f"{where}.precisions.{p}.parity"),
            _typed(pe.get("calibration", {}), dict, f"{where}.precisions.{p}.calibration"),
        )
    if not precisions:
        raise IntegrityError(f"manifest {where}: no precisions")
    return ComponentEntry(
        inputs=tuple(
            _tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(_typed(v["inputs"], list, where))
        ),
        outputs=tuple(
            _tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(_typed(v["outputs"], list, where))
        ),
        dims={
            _name(k, f"{where}.dims"): _dim(d, f"{where}.dims.{k}")
            for k, d in _typed(v["dims"], dict, where).items()
        },
        precisions=precisions,
        calibration_data=_typed(v.get("calibration_data", "images"), str, f"{where}.calibration_data"),
    )


def _engine(value: Any, where: str) -> EngineEntry:
    v = _obj(value, where, {"backend", "version", "device", "settings", "files"})
    files = {
        _name(k, f"{where}.files"): check_relpath(_typed(p, str, f"{where}.files.{k}"), f"{where}.files.{k}")
        for k, p in _typed(v["files"], dict, f"{where}.files").items()
    }
    backend = _typed(v["backend"], str, f"{where}.backend")
    if backend not in ("tensorrt", "ort"):
        raise IntegrityError(f"manifest {where}.backend: {backend!r} is not 'tensorrt' or 'ort'")
    return EngineEntry(
        backend,
        _typed(v["version"], str, f"{where}.version"),
        _typed(v["device"], str, f"{where}.device"),
        _typed(v["settings"], dict, f"{where}.settings"),
        files,
    )


def parse_manifest(text: str | bytes) -> Manifest:
    """Parse and validate manifest JSON; any deviation from the schema is an IntegrityError."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"manifest is {len(text)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"manifest is not valid JSON: {exc}") from None
    keys = {
        "schema",
        "name",
        "family",
        "task",
        "provenance",
        "preprocess",
        "tokenizer",
        "generation",
        "files",
        "components",
    }
    v = _obj(raw, "root", keys, {"engines"})
    if v["schema"] != SCHEMA:
        raise IntegrityError(f"manifest schema {v['schema']!r} is not supported; expected {SCHEMA!r}")
    task = _typed(v["task"], str, "task")
    if task not in TASKS:
        raise IntegrityError(f"manifest task {task!r} not in {TASKS}")
    files = {}
    for path, e in _typed(v["files"], dict, "files").items():
        fe = _obj(e, f"files.{path}", {"sha256", "size"})
        sha = _typed(fe["sha256"], str, f"files.{path}.sha256")
        if not _SHA256.match(sha):
            raise IntegrityError(f"manifest files.{path}.sha256 is not a lowercase hex sha256")
        size = _typed(fe["size"], int, f"files.{path}.size")
        if size < 0:
            raise IntegrityError(f"manifest files.{path}.size is negative")
        files[check_relpath(path, "files key")] = FileEntry(sha, size)
    m = Manifest(
        name=_name(v["name"], "name"),
        family=_name(v["family"], "family"),
        task=task,
        provenance=_typed(v["provenance"], dict, "provenance"),
        preprocess=_typed(v["preprocess"], dict, "preprocess"),
        tokenizer=_typed(v["tokenizer"], dict, "tokenizer"),
        generation=_typed(v["generation"], dict, "generation"),
        files=files,
        components={
            _name(k, "components"): _component(c, f"components.{k}")
            for k, c in _typed(v["components"], dict, "components").items()
        },
        engines={
            _name(k, "engines"): _engine(e, f"engines.{k}")
            for k, e in _typed(v.get("engines", {}), dict, "engines").items()
        },
    )
    _check_references(m)
    return m


def _check_references(m: Manifest) -> None:
    """Every file a component or engine names must be listed (hashed) in `files`."""
    named = [p.file for c in m.components.values() for p in c.precisions.values()]
    named += [f for e in m.engines.values() for f in e.files.values()]
    tok = m.tokenizer.get("file")
    if tok is not None:
        named.append(check_relpath(tok, "tokenizer.file"))
    for path in named:
        if path not in m.files:
            raise IntegrityError(f"manifest names {path!r} but does not list its hash in 'files'")
