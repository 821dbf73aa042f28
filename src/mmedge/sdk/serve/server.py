"""The server process: open the packages, run uvicorn, drain on SIGTERM / Ctrl-C.

On a shutdown signal `/ready` turns 503 at once, the listening socket closes, and requests in
flight (streams included) get `shutdown_timeout_s` to finish before they are cancelled.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from mmedge.errors import ConfigError
from mmedge.runtime.pipelines import AnyPipeline
from mmedge.sdk.pipeline import Pipeline
from mmedge.sdk.serve.app import create_app
from mmedge.sdk.serve.config import ServeConfig

log = logging.getLogger("mmedge.serve")


def open_pipelines(
    packages: Sequence[str | os.PathLike[str]],
    backend: str,
    precision: str,
    threads: int,
) -> dict[str, AnyPipeline]:
    """Model name (the package's name) -> its verified pipeline; two packages may not share a name."""
    out: dict[str, AnyPipeline] = {}
    for package in packages:
        pipe = Pipeline(package, backend=backend, precision=precision, threads=threads)
        name = pipe.runner.manifest.name
        if name in out:
            raise ConfigError(f"two packages are named {name!r}; serve each name once")
        out[name] = pipe
    return out


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.draining = True  # /ready answers 503 while requests drain
        super().handle_exit(sig, frame)


class Server:
    """uvicorn around the app for `pipelines`; `run` blocks until shutdown."""

    def __init__(self, pipelines: dict[str, AnyPipeline], config: ServeConfig, log_level: str = "info"):
        self.config = config
        self.app = create_app(pipelines, config)
        self.uvicorn = _Server(
            uvicorn.Config(
                self.app,
                host=config.host,
                port=config.port,
                log_level=log_level,
                timeout_graceful_shutdown=int(config.shutdown_timeout_s) or None,
                proxy_headers=False,  # do not trust X-Forwarded-* from whoever connects
                server_header=False,
                lifespan="on",
            ),
            self.app,
        )

    @property
    def state(self) -> Any:
        return self.app.state

    def bind(self) -> socket.socket:
        """The listening socket (port 0: one the OS chooses)."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}"
            ) from None
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
        return sock

    def run(self, sock: socket.socket | None = None) -> None:
        sock = sock or self.bind()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"mmedge serve: listening on http://{shown}:{port}", file=sys.stderr, flush=True)
        self.uvicorn.run(sockets=[sock])

    def stop(self) -> None:
        """Begin a graceful shutdown, as SIGTERM does."""
        self.uvicorn.handle_exit(15, None)
