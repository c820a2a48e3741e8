"""How array data travels between this process and a lease's executor.

``ArenaPath`` (ipc executors): arguments are written once into the lease's shared-memory arena
and only descriptors travel on the socket; host copies of results are read from arena regions
the executor filled. ``SocketPath`` (tcp executors): no shared memory at all; an argument's bytes
go as an extra frame of the signed invocation (the pickle names it by index), and a fetch's
arrays come back as frames of the signed reply: data "pickled through the socket", as a network
API remoting system must do it.

The extra-frame form rather than bytes inside the pickle: each array is copied once into its
ZeroMQ message when the call is sent (so the caller may change the array right after
``submit``), instead of once into the pickle and again into the message; the executor reads the
frame in place, and a fetched array is a view of the received message (beyond the copy from the
device, only the socket's own copies). The pickle goes through the same persistent-id hook as
the arena's descriptors, so the executor turns both into device arrays at one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .wire.arena import Arena, Region
from .wire.limits import ARRAY_CHUNK

PersistentId = tuple[Any, ...]


@dataclass
class Outgoing:
    """What one request's arrays took: arena regions (freed when the call ends) or frames."""

    regions: list[Region] = field(default_factory=list)
    buffers: list[memoryview] = field(default_factory=list)


class DataPath(Protocol):
    name: str

    def put(self, array: np.ndarray, out: Outgoing) -> PersistentId:
        """Make an argument array travel; returns the persistent id that names it."""
        ...

    def fetch_items(self, handles: Sequence[tuple[int, int]], out: Outgoing) -> list[list[Any]]:
        """The ``fetch`` items for (handle, nbytes) pairs."""
        ...

    def fetched(
        self, out: Outgoing, shapes: Sequence[tuple[np.dtype, tuple[int, ...]]], frames: list[Any]
    ) -> list[np.ndarray]:
        """The host arrays of a fetch that succeeded."""
        ...

    def discard(self, out: Outgoing) -> None:
        """Give back what a request took (it ended, or was never sent)."""
        ...


class ArenaPath:
    name = "ipc"

    def __init__(self, arena: Arena) -> None:
        self.arena = arena

    def put(self, array: np.ndarray, out: Outgoing) -> PersistentId:
        region = self.arena.write(array)
        out.regions.append(region)
        return ("arr", region.segment, region.offset, region.nbytes, array.dtype, array.shape)

    def fetch_items(self, handles: Sequence[tuple[int, int]], out: Outgoing) -> list[list[Any]]:
        items = []
        for handle, nbytes in handles:
            region = self.arena.alloc(nbytes)
            out.regions.append(region)
            items.append([handle, region.segment, region.offset, nbytes])
        return items

    def fetched(
        self, out: Outgoing, shapes: Sequence[tuple[np.dtype, tuple[int, ...]]], frames: list[Any]
    ) -> list[np.ndarray]:
        regions, out.regions = out.regions, []  # each view frees its region when collected
        return [
            self.arena.array_view(region, dtype, shape)
            for region, (dtype, shape) in zip(regions, shapes, strict=True)
        ]

    def discard(self, out: Outgoing) -> None:
        regions, out.regions = out.regions, []
        for region in regions:
            self.arena.free(region)


class SocketPath:
    name = "tcp"

    def put(self, array: np.ndarray, out: Outgoing) -> PersistentId:
        """One frame per array, or frames of ``ARRAY_CHUNK`` bytes for a larger one (the
        executor refuses larger frames before it can check a signature: limits.py)."""
        flat = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        if flat.nbytes <= ARRAY_CHUNK:
            out.buffers.append(flat)
            return ("buf", len(out.buffers) - 1, array.dtype, array.shape)
        first = len(out.buffers)
        out.buffers.extend(flat[i : i + ARRAY_CHUNK] for i in range(0, flat.nbytes, ARRAY_CHUNK))
        return ("buf", list(range(first, len(out.buffers))), array.dtype, array.shape)

    def fetch_items(self, handles: Sequence[tuple[int, int]], out: Outgoing) -> list[list[Any]]:
        return [[handle, nbytes] for handle, nbytes in handles]

    def fetched(
        self, out: Outgoing, shapes: Sequence[tuple[np.dtype, tuple[int, ...]]], frames: list[Any]
    ) -> list[np.ndarray]:
        if len(frames) != len(shapes):
            raise ValueError(f"the fetch reply carries {len(frames)} arrays, not {len(shapes)}")
        return [
            _host_array(frame, dtype, shape)
            for frame, (dtype, shape) in zip(frames, shapes, strict=True)
        ]

    def discard(self, out: Outgoing) -> None:
        out.buffers = []


def _host_array(frame: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A writable array over a received frame: large frames arrive as writable views of the
    ZeroMQ message (no copy); small ones arrive as bytes and are copied into a bytearray."""
    if not isinstance(frame, memoryview) or frame.readonly:
        frame = bytearray(frame)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(frame) != expected:
        raise ValueError(f"fetched array of {len(frame)} bytes, expected {expected}")
    return np.frombuffer(frame, dtype=dtype).reshape(shape)


__all__ = ["ArenaPath", "DataPath", "Outgoing", "SocketPath"]
