"""`mmedge serve --ray`: the same app as a Ray Serve deployment, N replicas behind Ray's HTTP proxy.

Each replica opens its own copy of the packages (checked against the manifests the driver verified,
see `sdk/ray_cluster.py`) and serves them with `create_app`, as `mmedge serve` does: its own queue,
dynamic batching, limits, token check and metrics. Ray's proxies listen on the configured host and
port and spread requests over the replicas. Ray is imported only when a function is called.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from mmedge import errors
from mmedge.errors import ConfigError, InvalidInputError, MmedgeError
from mmedge.sdk.ray_cluster import PackageRef, connect
from mmedge.sdk.serve.app import create_app
from mmedge.sdk.serve.config import ServeConfig

APP_NAME = "mmedge"


def package_refs(packages: Sequence[str | os.PathLike[str]]) -> list[PackageRef]:
    """The packages, verified here; two with one name are refused as `mmedge serve` refuses them."""
    refs: list[PackageRef] = []
    for package in packages:
        ref = PackageRef.of(package)
        if any(r.name == ref.name for r in refs):
            raise ConfigError(f"two packages are named {ref.name!r}; serve each name once")
        refs.append(ref)
    return refs


def application(
    refs: Sequence[PackageRef], config: ServeConfig, replicas: int, backend: str, precision: str, threads: int
) -> Any:
    """The bound Ray Serve application: `replicas` copies of the app, each reserving max(1, threads) CPUs."""
    from ray import serve

    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InvalidInputError(f"replicas must be a positive int, got {replicas!r}")

    if replicas > 1:
        config = dataclasses.replace(config, index_routes=False)

    @serve.ingress()
    class Replica:
        def __init__(self, refs: Sequence[PackageRef]):
            self.pipelines = {ref.name: ref.open(backend, precision, threads) for ref in refs}

        def __serve_build_asgi_app__(self) -> Any:
            return create_app(self.pipelines, config)

    deployment = serve.deployment(
        name=APP_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": max(1, threads)},
        # Requests go on to a replica until its own admission answers 429, as one server does.
        max_ongoing_requests=config.workers + config.max_queue + 1,
        graceful_shutdown_timeout_s=config.shutdown_timeout_s,
    )(Replica)
    return deployment.bind(list(refs))


def deploy(
    packages: Sequence[str | os.PathLike[str]],
    config: ServeConfig,
    replicas: int,
    backend: str,
    precision: str,
    threads: int,
    address: str | None = None,
) -> str:
    """Run the deployment on the Ray instance at `address` ($RAY_ADDRESS; else a local one) and return
    its URL once every replica is ready. `undeploy` removes it."""
    if config.port == 0:
        raise ConfigError("with --ray, give a fixed --port: Ray's proxies listen on it on every node")
    refs = package_refs(packages)
    return launch(application(refs, config, replicas, backend, precision, threads), config, address)


def launch(app: Any, config: ServeConfig, address: str | None = None) -> str:
    """Run a bound application (`application`) under the name APP_NAME; a replica that cannot start
    raises its own mmedge error here, and nothing is left deployed."""
    connect(address)
    from ray import serve

    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError:
        error = _replica_error()
        undeploy()
        if error is None:
            raise
        raise error from None
    shown = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{shown}:{config.port}"


def _replica_error() -> MmedgeError | None:
    """The mmedge error a replica's constructor raised. Ray reports a failed replica in the
    deployment's status message, a traceback whose last line is `module.Type: message`."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    state = app.deployments.get(APP_NAME) if app is not None else None
    lines = state.message.strip().splitlines() if state is not None and state.message else []
    name, _, message = (lines[-1] if lines else "").partition(": ")
    kind = (
        getattr(errors, name.removeprefix("mmedge.errors."), None)
        if name.startswith("mmedge.errors.")
        else None
    )
    return kind(message) if isinstance(kind, type) and issubclass(kind, MmedgeError) else None


def undeploy() -> None:
    """Remove the deployment; its replicas finish requests in flight first (up to the shutdown timeout)."""
    from ray import serve

    serve.delete(APP_NAME)


def serve_until_stopped(
    packages: Sequence[str | os.PathLike[str]],
    config: ServeConfig,
    replicas: int,
    backend: str,
    precision: str,
    threads: int,
    address: str | None = None,
) -> None:
    """`mmedge serve --ray`: deploy, then hold the deployment until SIGTERM or Ctrl-C."""
    import ray

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = deploy(packages, config, replicas, backend, precision, threads, address)
        print(f"mmedge serve: {replicas} replicas on Ray, listening on {url}", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if ray.is_initialized():
            undeploy()
            ray.shutdown()  # a local instance stops with its driver; a cluster keeps running
