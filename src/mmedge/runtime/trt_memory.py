"""Device memory of one TensorRT session: buffers allocated once per tensor, pinned host staging.

A buffer is allocated the first time a tensor is bound and kept for every later run; a larger shape
grows it (free, then allocate the new size), a smaller one reuses it. Host <-> device copies go
through page-locked staging buffers (`cudaMallocHost`), so they are true asynchronous DMA instead
of the driver's extra copy of pageable memory. `traffic` counts the bytes each way, which is how
tests check that a decode step moves only its own token.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmedge.errors import BackendError


def cuda_call(result: Any, what: str) -> Any:
    """cuda-python calls return (error, *values): raise on error, return the value(s)."""
    err, *values = result
    if err != type(err).cudaSuccess:
        raise BackendError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class _Buffer:
    ptr: int
    nbytes: int


@dataclass
class Traffic:
    """Bytes copied since the session was made (or since `reset`)."""

    host_to_device: int = 0
    device_to_host: int = 0
    device_to_device: int = 0

    def reset(self) -> None:
        self.host_to_device = self.device_to_host = self.device_to_device = 0


class DeviceMemory:
    """Named device buffers and pinned staging buffers, all on one CUDA stream."""

    def __init__(self, cudart: Any, stream: Any):
        self._rt, self.stream = cudart, stream
        self._device: dict[str, _Buffer] = {}
        self._pinned: dict[str, _Buffer] = {}
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (pinned view, destination) after sync
        self.traffic = Traffic()

    def device(self, name: str, nbytes: int) -> int:
        """The device address of `name`'s buffer, at least `nbytes` large."""
        return self._grow(self._device, name, nbytes, pinned=False).ptr

    def _grow(self, table: dict[str, _Buffer], name: str, nbytes: int, pinned: bool) -> _Buffer:
        buf = table.get(name)
        if buf is not None and buf.nbytes >= nbytes:
            return buf
        if buf is not None:  # the stream may still read it: wait, then free
            cuda_call(self._rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            self._free(buf, pinned)
        size = max(int(nbytes), 1)
        alloc = self._rt.cudaMallocHost if pinned else self._rt.cudaMalloc
        table[name] = _Buffer(int(cuda_call(alloc(size), "cudaMallocHost" if pinned else "cudaMalloc")), size)
        return table[name]

    def _staging(self, name: str, arr: np.ndarray) -> np.ndarray:
        """A pinned host array of `arr`'s shape and dtype (a view of `name`'s staging buffer)."""
        buf = self._grow(self._pinned, name, arr.nbytes, pinned=True)
        raw = (ctypes.c_char * max(arr.nbytes, 1)).from_address(buf.ptr)
        return np.frombuffer(memoryview(raw), arr.dtype, count=arr.size).reshape(arr.shape)

    def upload(self, name: str, arr: np.ndarray) -> int:
        """Copy `arr` to `name`'s device buffer (through its pinned staging); return the address."""
        ptr = self.device(name, arr.nbytes)
        if arr.nbytes:
            staged = self._staging(name, arr)
            np.copyto(staged, arr)
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            cuda_call(
                self._rt.cudaMemcpyAsync(ptr, staged.ctypes.data, arr.nbytes, kind, self.stream),
                "copy to GPU",
            )
            self.traffic.host_to_device += arr.nbytes
        return ptr

    def download(self, name: str, out: np.ndarray) -> None:
        """Queue a copy of `name`'s device buffer into `out`; it lands at `synchronize`."""
        if not out.nbytes:
            return
        staged = self._staging(name, out)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        src = self._device[name].ptr
        cuda_call(
            self._rt.cudaMemcpyAsync(staged.ctypes.data, src, out.nbytes, kind, self.stream), "copy from GPU"
        )
        self.traffic.device_to_host += out.nbytes
        self._pending.append((staged, out))

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int) -> None:
        """Device-to-device copy of `rows` rows of `width` bytes between pitched buffers."""
        if width and rows:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            cuda_call(
                self._rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, kind, self.stream),
                "device copy",
            )
            self.traffic.device_to_device += width * rows

    def synchronize(self) -> None:
        """Wait for the stream; then the queued downloads are in their destinations."""
        cuda_call(self._rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        for staged, out in self._pending:
            np.copyto(out, staged)
        self._pending.clear()

    def _free(self, buf: _Buffer, pinned: bool) -> None:
        (self._rt.cudaFreeHost if pinned else self._rt.cudaFree)(buf.ptr)

    def close(self) -> None:
        """Free every buffer (after the stream's work is done)."""
        if not (self._device or self._pinned):
            return
        self._rt.cudaStreamSynchronize(self.stream)
        for table, pinned in ((self._device, False), (self._pinned, True)):
            for buf in table.values():
                self._free(buf, pinned)
            table.clear()
        self._pending.clear()
