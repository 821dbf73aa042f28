"""Errors as clients see them: OpenAI's `{"error": {"message", "type", "code"}}` with a status.

Typed mmedge errors keep their message (they say what was wrong with the request); anything
else is logged here and reaches the client only as a generic message, never as a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any

from mmedge.errors import (
    DeadlineExceededError,
    InvalidInputError,
    MmedgeError,
    ModelNotFoundError,
    UnsupportedError,
)

log = logging.getLogger("mmedge.serve")


class ApiError(Exception):
    """An HTTP error answered as a JSON error object."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}


class OverloadedError(ApiError):
    """The queue is full: 429 with Retry-After."""

    def __init__(self, retry_after_s: int):
        super().__init__(429, "the server is at capacity; retry later", "rate_limit_error", "queue_full")
        self.headers = {"Retry-After": str(retry_after_s)}


def from_exception(exc: BaseException) -> ApiError:
    """The client's view of an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DeadlineExceededError):
        return ApiError(504, "the model did not answer in time", "timeout_error", "timeout")
    if isinstance(exc, InvalidInputError):
        return ApiError(400, str(exc), "invalid_request_error", "invalid_value")
    if isinstance(exc, ModelNotFoundError):
        return ApiError(404, str(exc), "invalid_request_error", "model_not_found")
    if isinstance(exc, UnsupportedError):
        return ApiError(400, str(exc), "invalid_request_error", "unsupported")
    if isinstance(exc, MmedgeError):  # an integrity or backend failure: the operator's problem
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return ApiError(500, "the model failed to run this request", "server_error", "model_error")
    log.error("unexpected error while serving a request", exc_info=exc)
    return ApiError(500, "internal server error", "server_error", "internal_error")
