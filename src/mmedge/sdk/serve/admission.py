"""Admission and execution of model work: a bounded queue in front of a fixed thread pool.

Model calls block (ONNX Runtime releases the GIL while it runs), so they run in the pool, never on
the event loop. A request is admitted while fewer than `workers + max_queue` requests hold a
place; the next one is refused at once with 429 (`OverloadedError`) rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from mmedge.sdk.serve.errors import OverloadedError
from mmedge.sdk.serve.metrics import ServeMetrics

T = TypeVar("T")


class Admission:
    """Places for requests (running or waiting) and the pool that runs their model work."""

    def __init__(self, workers: int, max_queue: int, retry_after_s: int, metrics: ServeMetrics):
        self.capacity, self.workers, self.retry_after_s = workers + max_queue, workers, retry_after_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmedge-serve")
        self.metrics = metrics
        self.admitted = 0  # requests holding a place; changed on the event loop only
        self._waiting = 0  # jobs submitted to the pool and not started yet
        self._lock = threading.Lock()

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Hold a place for one request's lifetime, or raise OverloadedError (429) when none is free."""
        if self.admitted >= self.capacity:
            self.metrics.rejected.inc()
            raise OverloadedError(self.retry_after_s)
        self.admitted += 1
        self.metrics.in_flight.set(self.admitted)
        try:
            yield
        finally:
            self.admitted -= 1
            self.metrics.in_flight.set(self.admitted)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run blocking work in the pool and await its result (cancelling the wait drops the job
        if it has not started; a started job runs to its end)."""
        with self._lock:
            self._waiting += 1
        self._update()
        job = self.pool.submit(self._started, fn)
        try:
            return await asyncio.wrap_future(job)
        finally:
            if job.cancelled():
                with self._lock:
                    self._waiting -= 1
                self._update()

    def _started(self, fn: Callable[[], T]) -> T:
        with self._lock:
            self._waiting -= 1
        self._update()
        return fn()

    def _update(self) -> None:
        self.metrics.queue_depth.set(self._waiting)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
