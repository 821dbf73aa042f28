"""The on-device TensorRT engine cache: engines a "tensorrt" bundle builds on first use, kept for reuse.

Engines cannot move between GPUs or TensorRT versions, so a bundle carries ONNX and the device
builds each engine once, into `$MMEDGE_HOME/.engines/` (the leading dot keeps it out of the
package list). An entry is named by a key over everything that makes an engine valid: the ONNX
file's sha256 (and its external data's), the optimization profile and shape-tensor value ranges,
the precision, every build setting (defaults filled in), the exact TensorRT version, the GPU
(compute capability and name) and the platform. A change to any of them is a new key, so a
stale engine is never found.

Each entry is `<key>.plan` and `<key>.json` (its meta: what it was built from, its size and sha256,
and a MAC under this installation's key, `local_key.py`). Engines are executable artifacts: an
entry is used only when its meta's MAC checks and the plan's bytes hash to the meta's sha256;
anything else (a torn write, an edited plan, an entry copied from elsewhere) is rebuilt, never
deserialized. Writes go to a temp file in the same directory and are renamed into place, plan
first, meta last; a lock file per key (`fcntl.flock`) makes concurrent first uses build once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mmedge.errors import InvalidInputError
from mmedge.runtime.staging import write_atomic
from mmedge.runtime.trt_plan import EngineSource, check_settings

log = logging.getLogger(__name__)

CACHE_DIR = ".engines"  # under the model store; hidden from its package listing
SCHEMA = "mmedge.engine-cache/2"
_MAX_META_BYTES = 1 << 16


@dataclass(frozen=True)
class DeviceIdentity:
    """What an engine is tied to beyond its inputs: the exact TensorRT version, the GPU (compute
    capability and name) and the platform ("linux-aarch64": a Jetson and an x86 server with the
    same GPU architecture do not share engines)."""

    tensorrt: str
    compute_capability: str
    name: str
    platform: str


@dataclass(frozen=True)
class EngineSpec:
    """What one engine is built from: the ONNX file's sha256, the sha256 of each file holding its
    external tensors (a graph saved with external weights is the same bytes whatever the weights),
    what the manifest says of the component at this precision (`source`: profile, integer value
    ranges, weight-only type) and every build setting. `label` ("<package>/<component>.<precision>")
    is for listings only and not part of the key: two packages with the same graph and weights
    share an engine."""

    onnx_sha256: str
    source: EngineSource
    settings: Mapping[str, Any] = field(default_factory=dict)
    external_data: Mapping[str, str] = field(default_factory=dict)
    label: str = ""


class EngineBuilder(Protocol):
    """Builds a serialized engine from a self-contained ONNX model in memory."""

    def __call__(self, model: bytes, source: EngineSource, settings: Mapping[str, Any]) -> bytes: ...


@dataclass(frozen=True)
class CachedEngine:
    """An engine's bytes and their sha256 (checked against its meta); `built`: made by this call."""

    key: str
    data: bytes
    sha256: str
    built: bool


@dataclass(frozen=True)
class CacheEntry:
    """One entry as `list_engines` reports it; `valid` means the meta's MAC and the plan's size check
    (the plan's sha256 is checked when it is used)."""

    key: str
    label: str
    size: int
    tensorrt: str
    compute_capability: str
    device_name: str
    created: str
    valid: bool


def cache_dir() -> Path:
    """Where engines built on this device live: `$MMEDGE_HOME/.engines`."""
    from mmedge.runtime.store import model_home

    return model_home() / CACHE_DIR


def _canonical(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"engine build settings must be JSON values: {exc}") from None


def _spec_record(spec: EngineSpec) -> dict[str, Any]:
    # through JSON so that tuples and lists, or int-valued settings spelled either way, key alike
    record: dict[str, Any] = json.loads(
        _canonical(
            {
                "onnx_sha256": spec.onnx_sha256,
                "external_data": dict(spec.external_data),
                "source": asdict(spec.source),
                "settings": check_settings(spec.settings),  # defaults filled in: they are part of the engine
            }
        )
    )
    return record


def engine_key(spec: EngineSpec, device: DeviceIdentity) -> str:
    """The entry name: sha256 over the spec (label excluded) and the device identity."""
    blob = _canonical({"schema": SCHEMA, "spec": _spec_record(spec), "device": asdict(device)})
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_regular(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes (no symlink followed), or None when absent, not regular or over `limit`."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return f.read(limit + 1)


def _signed(meta: Mapping[str, Any]) -> bytes:
    return _canonical({k: v for k, v in meta.items() if k != "mac"}).encode()


class EngineCache:
    """Engines keyed by what they were built from and where; `get` builds on a miss.

    `builder` defaults to TensorRT's (`trt_build.device_builder`); `root` to `cache_dir()`."""

    def __init__(self, root: str | os.PathLike | None = None, builder: EngineBuilder | None = None):
        self.root = Path(root) if root is not None else cache_dir()
        self._builder = builder

    def plan_path(self, key: str) -> Path:
        return self.root / f"{key}.plan"

    def meta_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(
        self,
        spec: EngineSpec,
        device: DeviceIdentity,
        read_onnx: Callable[[], bytes],
        check: Callable[[bytes, str], dict[str, Any]] | None = None,
    ) -> CachedEngine:
        """The engine for `spec` on `device`: the cached one when its entry checks, else one built now
        from `read_onnx()` (called only on a miss), passed through `check(plan, sha256)` (which
        raises to refuse it; its record goes into the entry's meta) and stored for the next use."""
        key = engine_key(spec, device)
        hit = self._read(key, spec, device)
        if hit is not None:
            return hit
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked(key):
            hit = self._read(key, spec, device)  # another process built it while this one waited
            if hit is not None:
                return hit
            self._discard(key)  # a torn or stale entry, temp files of a build that was killed
            log.info("building the TensorRT engine %s (%s) on first use", spec.label or key[:16], device.name)
            data = bytes(self._build(read_onnx(), spec.source, dict(spec.settings)))
            digest = hashlib.sha256(data).hexdigest()
            checked = check(data, digest) if check is not None else {}
            self._store(key, spec, device, data, digest, checked)
            return CachedEngine(key, data, digest, built=True)

    def _build(self, model: bytes, source: EngineSource, settings: dict[str, Any]) -> bytes:
        if self._builder is None:
            from mmedge.runtime.trt_build import device_builder

            self._builder = device_builder
        return self._builder(model, source, settings)

    def _store(
        self,
        key: str,
        spec: EngineSpec,
        device: DeviceIdentity,
        data: bytes,
        digest: str,
        checked: dict[str, Any],
    ) -> None:
        from mmedge.runtime.local_key import local_key, mac

        secret = local_key(create=True)
        if secret is None:  # the store cannot be written: run the engine, keep nothing
            log.warning(
                "the engine cache %s cannot be written; the engine is rebuilt on every load", self.root
            )
            return
        meta: dict[str, Any] = {
            "schema": SCHEMA,
            "key": key,
            "label": spec.label,
            "spec": _spec_record(spec),
            "device": asdict(device),
            "size": len(data),
            "sha256": digest,
            "check": checked,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        meta["mac"] = mac(secret, _signed(meta))
        write_atomic(self.plan_path(key), data)  # the plan first: a meta always follows a whole plan
        write_atomic(self.meta_path(key), _canonical(meta))

    def _read(self, key: str, spec: EngineSpec, device: DeviceIdentity) -> CachedEngine | None:
        meta = self._meta(key)
        if meta is None:
            return None
        if meta.get("spec") != _spec_record(spec) or meta.get("device") != asdict(device):
            log.warning("engine cache entry %s does not describe this build; rebuilding it", key[:16])
            return None
        size = meta.get("size")
        data = _read_regular(self.plan_path(key), size if isinstance(size, int) else -1)
        if data is None or len(data) != size or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            log.warning("engine cache entry %s is incomplete or altered; rebuilding it", key[:16])
            return None
        return CachedEngine(key, data, str(meta["sha256"]), built=False)

    def _meta(self, key: str) -> dict[str, Any] | None:
        """The entry's meta when it parses, names `key` and its MAC checks under this installation's key."""
        from mmedge.runtime.local_key import local_key, mac_ok

        raw = _read_regular(self.meta_path(key), _MAX_META_BYTES)
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = None
        if (
            not isinstance(meta, dict)
            or meta.get("key") != key
            or not mac_ok(local_key(), _signed(meta), meta.get("mac"))
        ):
            log.warning(
                "engine cache entry %s has no valid meta (torn, edited or not written here)", key[:16]
            )
            return None
        return meta

    def _discard(self, key: str) -> None:
        """Remove an entry's files and its temp files; only under the key's lock."""
        for path in (self.meta_path(key), self.plan_path(key)):  # meta first: never a meta without its plan
            path.unlink(missing_ok=True)
        for tmp in self.root.glob(f".{key}.*.tmp"):  # `write_atomic`'s temp names
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Hold the key's lock: one builder per entry across threads and processes (flock locks an open
        file description, so two opens in one process exclude each other too)."""
        import fcntl

        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def entries(self) -> list[CacheEntry]:
        """Every entry that has a meta file, valid or not, by label."""
        from mmedge.runtime.local_key import local_key, mac_ok

        if not self.root.is_dir():
            return []
        secret, out = local_key(), []
        for path in sorted(self.root.glob("*.json")):
            key = path.stem
            raw = _read_regular(path, _MAX_META_BYTES)
            try:
                meta = json.loads(raw) if raw is not None else {}
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            device = meta.get("device")
            device = device if isinstance(device, dict) else {}
            plan = self.plan_path(key)
            valid = (
                meta.get("key") == key
                and mac_ok(secret, _signed(meta), meta.get("mac"))
                and plan.is_file()
                and not plan.is_symlink()
                and plan.stat().st_size == meta.get("size")
            )
            out.append(
                CacheEntry(
                    key=key,
                    label=str(meta.get("label", "")),
                    size=plan.stat().st_size if plan.is_file() else 0,
                    tensorrt=str(device.get("tensorrt", "")),
                    compute_capability=str(device.get("compute_capability", "")),
                    device_name=str(device.get("name", "")),
                    created=str(meta.get("created", "")),
                    valid=bool(valid),
                )
            )
        return sorted(out, key=lambda e: (e.label, e.key))

    def clear(self) -> int:
        """Remove every entry (plans, metas, locks, temp files); return how many plans were removed.
        Safe while engines are in use: a running session holds its engine in memory, and a build in
        flight at worst rebuilds its entry on the next load."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for path in self.root.iterdir():
            if path.is_file() or path.is_symlink():
                removed += path.suffix == ".plan" and not path.name.startswith(".")
                path.unlink(missing_ok=True)
        return removed


def list_engines(root: str | os.PathLike | None = None) -> list[CacheEntry]:
    """The engines this device has built (`$MMEDGE_HOME/.engines` unless `root`)."""
    return EngineCache(root).entries()


def clear_engines(root: str | os.PathLike | None = None) -> int:
    """Remove every cached engine; the next load of a "tensorrt" bundle builds again."""
    return EngineCache(root).clear()
