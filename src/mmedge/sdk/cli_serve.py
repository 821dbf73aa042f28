"""`mmedge serve`'s options (the server's limits, timeouts, auth and runtime settings)."""

from __future__ import annotations

import argparse

from mmedge.runtime.backends import BACKENDS, DEFAULT_BACKEND
from mmedge.runtime.manifest import AUTO_ORDER, REQUEST_PRECISIONS


def serve_arguments(sp: argparse.ArgumentParser, package_help: str) -> None:
    """Add `mmedge serve`'s arguments (all but the Ray group) to its parser."""
    sp.add_argument(
        "packages", nargs="+", metavar="PACKAGE", help=package_help + "; the model id is its name"
    )
    sp.add_argument(
        "--host", default="127.0.0.1", help="address to bind; anything but loopback needs a token"
    )
    sp.add_argument("--port", type=int, default=8000, help="port to bind (0: one the OS chooses, printed)")
    sp.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' on every route but /health and /ready "
        "(default: $MMEDGE_SERVE_TOKEN; prefer the variable: arguments show in process lists)",
    )
    sp.add_argument(
        "--allow-files",
        default=None,
        metavar="DIR",
        help="let file:// image URLs read images inside DIR (symlinks resolved); off by default",
    )
    sp.add_argument(
        "--allow-host",
        action="append",
        default=None,
        metavar="HOST",
        help="let http(s) image URLs fetch from HOST (exact, or *.example.com), repeatable; addresses that "
        "are loopback, private, link-local or reserved are refused whatever the list; no redirects",
    )
    sp.add_argument("--workers", type=int, default=4, help="threads running model work")
    sp.add_argument(
        "--max-queue",
        type=int,
        default=128,
        help="requests admitted beyond the workers' share; past it a request gets 429 with Retry-After",
    )
    sp.add_argument(
        "--batch-size", type=int, default=32, help="embedding inputs per model call (1: no batching)"
    )
    sp.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more inputs after its first",
    )
    sp.add_argument(
        "--max-body-bytes", type=int, default=16 * 1024 * 1024, help="request body cap (413 past it)"
    )
    sp.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="the largest max_tokens a request may ask for, and its default",
    )
    sp.add_argument(
        "--request-timeout", type=float, default=60.0, help="seconds a request may take (504 past it)"
    )
    sp.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds for one remote image fetch")
    sp.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM / Ctrl-C, seconds in-flight requests get to finish",
    )
    sp.add_argument(
        "--backend",
        default=DEFAULT_BACKEND,
        choices=sorted(BACKENDS),
        help="runtime backend for every package",
    )
    sp.add_argument(
        "--precision",
        default="auto",
        choices=REQUEST_PRECISIONS,
        help="auto = the best precision each component has (" + " > ".join(AUTO_ORDER) + ")",
    )
    sp.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per model call (0 = backend default)"
    )
    sp.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level",
    )
