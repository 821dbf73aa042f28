"""What mmedge needs of a Ray instance: a connection, and packages that every node opens and checks.

The same code runs on a local instance and on a cluster: `connect` joins the instance at `address`
(or $RAY_ADDRESS, or the latest one started on this host) and starts a local one only when there is
none. A package is named by a `PackageRef`: where each node finds it (an absolute path, or a name in
that node's model store) and the digest of the manifest the driver verified. A node opens its own
copy, verifies every file against its manifest, and refuses to run unless that manifest is the
driver's (so a stale or edited copy on one node cannot answer for the others). Ray is imported here
only when a function is called (the `ray` extra).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mmedge
from mmedge.errors import IntegrityError, MmedgeError, require
from mmedge.runtime.manifest import MANIFEST_NAME, Manifest
from mmedge.runtime.package import verify_package
from mmedge.runtime.pipelines import AnyPipeline
from mmedge.runtime.signing import trust_policy
from mmedge.runtime.store import resolve

ADDRESS_ENV = "RAY_ADDRESS"
_RAY_DATA_NOTE = "\nFailed to apply UDF transform"


def manifest_digest(manifest: Manifest) -> str:
    """sha256 of the parsed manifest in its canonical form: equal digests mean equal file hashes."""
    return hashlib.sha256(manifest.to_json().encode()).hexdigest()


@dataclass(frozen=True)
class PackageRef:
    """A package as the nodes of a Ray instance open it."""

    location: str  # an absolute path, or a store name each node resolves in its own $MMEDGE_HOME
    name: str
    task: str
    digest: str  # manifest_digest of the copy the driver verified
    version: str  # the driver's mmedge version: nodes must run the same code

    @classmethod
    def of(cls, name_or_path: str | os.PathLike[str]) -> PackageRef:
        """Verify the package here (under MMEDGE_TRUST, signatures included) and name it for the nodes."""
        root = resolve(name_or_path)
        package = verify_package(root, trust=trust_policy())
        given = Path(name_or_path).expanduser()
        by_path = (given / MANIFEST_NAME).is_file()
        location = str(root.resolve()) if by_path else str(name_or_path)
        m = package.manifest
        return cls(location, m.name, m.task, manifest_digest(m), mmedge.__version__)

    def open(self, backend: str, precision: str, threads: int) -> AnyPipeline:
        """On a node: the verified pipeline of this node's copy, refused unless it is the driver's."""
        from mmedge.sdk.pipeline import Pipeline

        node = socket.gethostname()
        if mmedge.__version__ != self.version:
            raise MmedgeError(
                f"node {node} runs mmedge {mmedge.__version__}; the driver runs {self.version}: "
                "install the same version on every node"
            )
        try:
            pipe = Pipeline(self.location, backend=backend, precision=precision, threads=threads)
        except MmedgeError as exc:  # the same type, saying which node could not open its copy
            raise type(exc)(f"node {node}: {exc}") from exc
        if manifest_digest(pipe.runner.manifest) != self.digest:
            raise IntegrityError(
                f"package {self.location!r} on node {node} is not the one the driver verified (its "
                "manifest differs): put the same package on every node"
            )
        return pipe


def connect(address: str | None = None, **local: Any) -> bool:
    """Join the Ray instance at `address` ($RAY_ADDRESS when None), or start a local one with the
    `local` arguments of ray.init when there is none. True when this call connected (the caller
    disconnects with ray.shutdown); False when the process was connected already."""
    require("ray", "ray")
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get(ADDRESS_ENV) or None
    if address is None:  # a new local instance: no dashboard, quiet logs
        ray.init(include_dashboard=False, log_to_driver=False, **local)
    else:  # a running instance sizes itself: local arguments do not apply
        ray.init(address=address, log_to_driver=False)
    return True


def typed_cause(exc: BaseException) -> MmedgeError | None:
    """The mmedge error behind an error Ray raised on the driver (a task's or actor's failure wraps
    the original exception in its `cause` or exception chain), or None."""
    import ray.exceptions

    for cause in _chain(exc):  # a RayTaskError may subclass the original type too: skip Ray's wrappers
        if isinstance(cause, MmedgeError) and not isinstance(cause, ray.exceptions.RayError):
            message = str(cause).split(_RAY_DATA_NOTE, 1)[0]  # Ray Data appends its retry note
            return type(cause)(message) if message != str(cause) else cause
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
