"""The lease's shared-memory arena: where array data travels between client and executor.

The client owns the arena: it creates segments (0600 files in /dev/shm, or in the temp dir
where /dev/shm is small, mapped by both sides;
plain files rather than ``multiprocessing.shared_memory``, whose resource tracker unlinks a
segment when any process that attached exits) and allocates regions in them. Only descriptors
(segment, offset, dtype, shape) travel on the socket. The executor maps a segment the first time
a descriptor names it and, on a GPU slice, registers it once as pinned memory so host-to-device
copies go straight from it.

A result copied back to the host is handed to the caller as a numpy view of its region (no
further copy); the region is freed when that array and every view of it are gone.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..procs import proc_start_ticks

ALIGN = 256  # bytes; keeps every region suitably aligned for any dtype and for DMA
DEFAULT_SEGMENT = 64 * 2**20


SHM_MIN_FREE = 4 * 2**30


def _shm_dirs() -> tuple[Path, ...]:
    """Where segments may live: /dev/shm, and the temp dir for machines whose /dev/shm is
    missing or small (containers often give it 64 MiB; touching a page beyond it is SIGBUS)."""
    return (Path("/dev/shm"), Path(tempfile.gettempdir()))


def _segment_dir() -> Path:
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize >= SHM_MIN_FREE:
            return shm
    except OSError:
        pass  # no /dev/shm at all: the temp dir below serves
    return Path(tempfile.gettempdir())


@dataclass(frozen=True)
class Region:
    segment: str  # path of the segment file
    offset: int
    nbytes: int


class _FreeList:
    """First-fit allocator over one segment, coalescing neighbours on free."""

    def __init__(self, size: int) -> None:
        self.starts: list[int] = [0]
        self.sizes: dict[int, int] = {0: size}

    def alloc(self, nbytes: int) -> int | None:
        need = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
        for i, start in enumerate(self.starts):
            size = self.sizes[start]
            if size >= need:
                del self.sizes[start]
                self.starts.pop(i)
                if size > need:
                    rest = start + need
                    self.sizes[rest] = size - need
                    bisect.insort(self.starts, rest)
                return start
        return None

    def free(self, start: int, nbytes: int) -> None:
        size = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
        i = bisect.bisect_left(self.starts, start)
        if i < len(self.starts) and self.starts[i] == start + size:  # merge with the next
            size += self.sizes.pop(self.starts.pop(i))
        if i > 0 and self.starts[i - 1] + self.sizes[self.starts[i - 1]] == start:
            self.sizes[self.starts[i - 1]] += size  # merge into the previous
            return
        self.starts.insert(i, start)
        self.sizes[start] = size


class Segment:
    """One mapped shared-memory file."""

    def __init__(self, path: str, size: int, create: bool) -> None:
        self.name = path
        self.path = Path(path)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self.size = size
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"region {offset}+{nbytes} lies outside segment {self.name}")
        return memoryview(self.map)[offset : offset + nbytes]

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Arena:
    """The client's side: segments it created, and the allocator over them (thread-safe)."""

    def __init__(self, tag: str, segment_size: int = DEFAULT_SEGMENT) -> None:
        self.tag = tag
        self.segment_size = segment_size
        self.segments: dict[str, Segment] = {}
        self.free_lists: dict[str, _FreeList] = {}
        self.lock = threading.Lock()
        self.closed = False

    def _new_segment(self, at_least: int) -> Segment:
        size = max(self.segment_size, (at_least + ALIGN - 1) // ALIGN * ALIGN)
        # Named by its creator (pid and start time): the broker's sweeper removes the segments
        # of a client that died without unlinking them (broker/sweeper.py).
        pid = os.getpid()
        creator = f"p{pid}t{proc_start_ticks(pid) or 0}"
        serial = f"{len(self.segments)}-{os.urandom(4).hex()}"
        name = f"mig-kernel-{os.getuid()}-{creator}-{self.tag}-{serial}"
        segment = Segment(str(_segment_dir() / name), size, create=True)
        self.segments[segment.name] = segment
        self.free_lists[segment.name] = _FreeList(size)
        return segment

    def alloc(self, nbytes: int) -> Region:
        with self.lock:
            if self.closed:
                raise RuntimeError("the arena is closed (its lease was released)")
            for name, free in self.free_lists.items():
                offset = free.alloc(nbytes)
                if offset is not None:
                    return Region(name, offset, nbytes)
            segment = self._new_segment(nbytes)
            offset = self.free_lists[segment.name].alloc(nbytes)
            assert offset is not None
            return Region(segment.name, offset, nbytes)

    def free(self, region: Region) -> None:
        with self.lock:
            free = self.free_lists.get(region.segment)
            if free is not None and not self.closed:
                free.free(region.offset, region.nbytes)

    def view(self, region: Region) -> memoryview:
        return self.segments[region.segment].view(region.offset, region.nbytes)

    def write(self, array: np.ndarray) -> Region:
        """Copy an array (any layout) into a fresh region, C-contiguous: one copy."""
        region = self.alloc(array.nbytes)
        if array.nbytes:
            target = np.frombuffer(self.view(region), dtype=array.dtype).reshape(array.shape)
            np.copyto(target, array, casting="no")
        return region

    def array_view(self, region: Region, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy array over a region; the region is freed once the array and its views are
        gone (numpy views keep this array alive as their base)."""
        if region.nbytes == 0:
            self.free(region)
            return np.empty(shape, dtype=dtype)
        flat = np.frombuffer(self.view(region), dtype=dtype)
        weakref.finalize(flat, self.free, region)  # on the base every view keeps alive
        return flat.reshape(shape)

    def close(self) -> None:
        """Unlink every segment. Mappings stay valid for arrays still in use."""
        with self.lock:
            self.closed = True
            for segment in self.segments.values():
                segment.unlink()


class ArenaMap:
    """The executor's side: segments mapped on first use (by name, inside the shm dir)."""

    def __init__(self, on_attach: object = None) -> None:
        self.segments: dict[str, Segment] = {}
        self.on_attach = on_attach  # callable(Segment): pins it on a GPU slice

    def view(self, segment: str, offset: int, nbytes: int) -> memoryview:
        mapped = self.segments.get(segment)
        if mapped is None:
            path = Path(segment)
            if path.parent not in _shm_dirs() or not path.name.startswith(
                f"mig-kernel-{os.getuid()}-"
            ):
                raise ValueError(f"{segment!r} is not an arena segment of this user")
            mapped = Segment(segment, 0, create=False)
            if callable(self.on_attach):
                self.on_attach(mapped)
            self.segments[segment] = mapped
        return mapped.view(offset, nbytes)
