"""ASGI layers around the app, outermost first: metrics, bearer-token auth, body size.

They run before routing and body parsing, so an unauthenticated or oversized request costs no
more than its headers (and at most `max_body_bytes` of body).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mmedge.sdk.serve.errors import ApiError
from mmedge.sdk.serve.metrics import ServeMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

ROUTES = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/search",
    "/v1/index/add",
    "/v1/index/remove",
    "/v1/models",
    "/health",
    "/ready",
    "/metrics",
)
OPEN_ROUTES = ("/health", "/ready")  # probes answer without a token


async def send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    # These answers come before the body is read: closing the connection stops the client's upload
    # (kept alive, the server would read and discard the rest of the body).
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class MetricsLayer:
    """Counts every HTTP request by route and status, errors by code, and times them to the last byte."""

    def __init__(self, app: App, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = {"code": 500}
        start = time.perf_counter()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status["code"])).inc()
            if status["code"] >= 400:
                self.metrics.errors.labels(route, str(status["code"])).inc()


class AuthLayer:
    """Requires `Authorization: Bearer <token>` on every route but the probes."""

    def __init__(self, app: App, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                given = given.strip() if scheme.lower() == b"bearer" else b""
        if not hmac.compare_digest(given, self.token):
            error = ApiError(
                401, "a valid bearer token is required", "authentication_error", "invalid_api_key"
            )
            error.headers = {"WWW-Authenticate": "Bearer"}
            await send_error(send, error)
            return
        await self.app(scope, receive, send)


class BodyLimitLayer:
    """Reads the whole body before the app runs, refusing (413) past `limit` bytes: at once when
    Content-Length says so, else as soon as the streamed body passes it, without reading the rest."""

    def __init__(self, app: App, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(
            413, f"the request body is larger than {self.limit} bytes", code="body_too_large"
        )
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await send_error(send, ApiError(400, "malformed Content-Length", code="invalid_request"))
                    return
                if int(value) > self.limit:
                    await send_error(send, too_large)
                    return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_error(send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)
