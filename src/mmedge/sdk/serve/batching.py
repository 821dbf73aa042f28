"""Dynamic batching of embedding inputs: concurrent requests share model calls.

A batch starts with the first waiting input and closes when it holds `size` inputs or `wait_s`
has passed; one batch per batcher runs at a time, so inputs arriving meanwhile form the next. A
request's inputs stay together (a request larger than `size` is a batch of its own). When a
batch of several requests fails, each request is run alone so that an error reaches only the
request that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmedge.sdk.serve.admission import Admission

# inputs -> ((N, D) vectors, (N,) token counts)
EmbedFn = Callable[[list[Any]], tuple[np.ndarray, np.ndarray]]


@dataclass
class _Job:
    items: list[Any]
    done: asyncio.Future[tuple[np.ndarray, np.ndarray]]


class Batcher:
    def __init__(
        self,
        embed: EmbedFn,
        admission: Admission,
        size: int,
        wait_s: float,
        on_batch: Callable[[int], None],
        on_queue: Callable[[int], None],
    ):
        self.embed, self.admission, self.size, self.wait_s = embed, admission, size, wait_s
        self.on_batch, self.on_queue = on_batch, on_queue
        self._jobs: deque[_Job] = deque()
        self._queued = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, items: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors and token counts of `items`, computed in some batch."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._collect())
        job = _Job(list(items), loop.create_future())
        self._jobs.append(job)
        self._queued += len(job.items)
        self.on_queue(self._queued)
        assert self._wake is not None
        self._wake.set()
        return await job.done

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _collect(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._jobs:
                deadline = loop.time() + self.wait_s
                while self._queued < self.size and (left := deadline - loop.time()) > 0:
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), left)
                await self._run(self._take())

    def _take(self) -> list[_Job]:
        batch: list[_Job] = []
        count = 0
        while self._jobs and (not batch or count + len(self._jobs[0].items) <= self.size):
            job = self._jobs.popleft()
            self._queued -= len(job.items)
            if not job.done.done():  # a request that timed out or went away is dropped
                batch.append(job)
                count += len(job.items)
        self.on_queue(self._queued)
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        if not batch:
            return
        items = [x for job in batch for x in job.items]
        self.on_batch(len(items))
        try:
            vectors, tokens = await self.admission.run(lambda: self.embed(items))
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
            else:
                for job in batch:
                    await self._run([job])
            return
        start = 0
        for job in batch:
            end = start + len(job.items)
            _settle(job, (vectors[start:end], tokens[start:end]))
            start = end


def _settle(job: _Job, result: tuple[np.ndarray, np.ndarray] | BaseException) -> None:
    if job.done.done():
        return
    if isinstance(result, BaseException):
        job.done.set_exception(result)
    else:
        job.done.set_result(result)
