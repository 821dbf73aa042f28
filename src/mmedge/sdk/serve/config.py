"""The operator's settings of a server, checked once at start-up."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from mmedge.errors import ConfigError

TOKEN_ENV = "MMEDGE_SERVE_TOKEN"
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServeConfig:
    """How a server binds, whom it lets in, and how much work it accepts.

    `allow_files` is the one directory whose files `file://` image URLs may read; `allow_hosts` the
    host names (exact, or `*.example.com`) whose http(s) image URLs may be fetched. A host on the
    list is still refused when it resolves to a loopback, private, link-local or reserved address.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    allow_files: Path | None = None
    allow_hosts: tuple[str, ...] = ()
    workers: int = 4  # threads running model work; more requests wait in the queue
    max_queue: int = 128  # requests admitted beyond the running ones; the next gets 429
    batch_size: int = 32  # embedding inputs per model call
    batch_wait_ms: float = 5.0  # how long a batch waits for more inputs after its first
    max_body_bytes: int = 16 * 1024 * 1024
    max_tokens: int = 256  # the largest max_tokens a request may ask for, and the default
    request_timeout_s: float = 60.0
    fetch_timeout_s: float = 10.0
    shutdown_timeout_s: float = 30.0  # in-flight requests get this long to finish on SIGTERM
    retry_after_s: int = 1
    # False where several replicas serve one model: each would keep its own in-memory index, so a
    # search could miss what another replica added. /v1/search and /v1/index/* then answer 400.
    index_routes: bool = True

    def __post_init__(self) -> None:
        positive = {
            "workers": self.workers,
            "batch_size": self.batch_size,
            "max_body_bytes": self.max_body_bytes,
            "max_tokens": self.max_tokens,
            "request_timeout_s": self.request_timeout_s,
            "fetch_timeout_s": self.fetch_timeout_s,
            "retry_after_s": self.retry_after_s,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.max_queue < 0 or self.batch_wait_ms < 0 or self.shutdown_timeout_s < 0:
            raise ConfigError("max_queue, batch_wait_ms and shutdown_timeout_s must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ConfigError("the bearer token must be a non-empty string without whitespace")
        if self.token is None and not is_loopback(self.host):
            raise ConfigError(
                f"binding to {self.host!r} exposes the server beyond this host: set a bearer token "
                f"(--token or {TOKEN_ENV}) or bind to 127.0.0.1"
            )
        if self.allow_files is not None and not self.allow_files.is_dir():
            raise ConfigError(f"--allow-files {str(self.allow_files)!r} is not a directory")
        for host in self.allow_hosts:
            bare = host.removeprefix("*.")
            if not bare or "*" in bare or "/" in bare or ":" in bare:
                raise ConfigError(
                    f"allowed host {host!r} must be a host name, or *.domain for its subdomains"
                )


def is_loopback(host: str) -> bool:
    """True for loopback addresses and `localhost`: only this host can connect."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
