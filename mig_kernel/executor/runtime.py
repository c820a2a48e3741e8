"""The array runtime of a slice and its warm start.

A GPU slice runs CuPy, a sim slice NumPy; functions see either as ``xp``. Warm start does, before
the executor reports ready, everything a first call would otherwise pay for: import, context
creation, and compiling and running a tiny kernel (about 2.4 s on an H100 when cold).
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import re
import resource
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from numpy import copyto as numpy_copyto
from numpy import frombuffer as numpy_frombuffer

from .simxp import SimDeviceArray, SimXP

CAP_EXCEEDED = "slice memory cap exceeded"  # the start of every cap error, GPU and sim alike
# What a sim call's own process may grow by beyond the slice's room: Python objects, pickles,
# ZeroMQ buffers of the executor's other thread. Not device memory, so not the user's.
SIM_SLACK = 64 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt: allocations from this size are mmap()ed and munmap()ed


def cap_message(cap: int, used: int, needed: int | None = None) -> str:
    """The one wording of a slice's memory cap, the same on a GPU (CuPy's pool limit) and on
    a sim slice (the executor's accounting and its data limit), so a user testing on sim
    meets the error they would meet on the GPU."""
    text = f"{CAP_EXCEEDED}: cap {cap / 2**30:.2f} GiB, in use {used / 2**30:.2f} GiB"
    if needed:
        text += f", this needs {needed / 2**30:.2f} GiB more"
    return text


def needed_bytes(exc: BaseException) -> int | None:
    """The size of the allocation an out-of-memory error failed on: NumPy's
    ``_ArrayMemoryError`` knows it; CuPy's ``OutOfMemoryError`` says it in its message."""
    size = getattr(exc, "_total_size", None)
    if isinstance(size, int):
        return size
    match = re.search(r"allocating ([\d,]+) bytes", str(exc))
    return int(match.group(1).replace(",", "")) if match else None


_statm: int | None = None  # /proc/self/statm, kept open: read at every sim call


def data_bytes() -> int:
    """This process's private writable memory and stack (``data`` of /proc/self/statm): what
    RLIMIT_DATA limits, plus the main thread's small stack. With a call's two setrlimits,
    4.2 us on the 2-core CPU machine."""
    global _statm
    if _statm is None:
        _statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    return int(os.pread(_statm, 256, 0).split()[5]) * mmap.PAGESIZE


class SimMemoryCap:
    """A sim slice's memory cap for what a call allocates itself (temporaries, results), not
    only what the data plane accounts (inputs and kept results): a user testing on sim must
    meet the out-of-memory error at the same allocation a GPU slice would refuse.

    While a call runs, the process's RLIMIT_DATA (which Linux applies to every private
    writable mapping: malloc's heap and its mmap()ed blocks) is its data size at the start
    plus the slice's room (cap minus what the data plane holds) plus ``SIM_SLACK``; NumPy then
    raises MemoryError at the allocation that would pass the cap, and ``exceeded`` restates it
    with the cap and the use. Large blocks are always mmap()ed (``mallopt``), so memory freed
    by one call does not count against the next. The pool's buffers and the arena are shared
    mappings, outside the limit: the data plane accounts those itself.
    """

    def __init__(self) -> None:
        self.started_with = 0  # VmData when the current call began
        self.supported = True
        self.outside: tuple[int, int] | None = None  # RLIMIT_DATA between calls
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            libc = ctypes.CDLL(None)
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)

    @contextlib.contextmanager
    def limit(self, room: int) -> Iterator[None]:
        restore = self.begin(room)
        try:
            yield
        finally:
            self.end(restore)

    def begin(self, room: int) -> tuple[int, int] | None:
        """Cap the call about to run; returns what ``end`` restores (None: nothing to).
        ``limit`` as two calls, for the data plane's hot path (no generator per call)."""
        if not self.supported:
            return None
        try:
            if self.outside is None:  # nobody else changes it: read once
                self.outside = resource.getrlimit(resource.RLIMIT_DATA)
            hard = self.outside[1]
            self.started_with = data_bytes()
            wanted = self.started_with + max(0, room) + SIM_SLACK
            if hard != resource.RLIM_INFINITY:
                wanted = min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (wanted, hard))
        except (OSError, ValueError, IndexError):  # no /proc, or a limit it may not set
            self.supported = False
            return None
        return self.outside

    @staticmethod
    def end(restore: tuple[int, int] | None) -> None:
        if restore is not None:
            resource.setrlimit(resource.RLIMIT_DATA, restore)

    def grown(self) -> int:
        """Bytes the running call holds beyond what it started with (its temporaries)."""
        try:
            return max(0, data_bytes() - self.started_with)
        except OSError:
            return 0


class SimMemoryPool:
    """Reusable host buffers standing in for device memory on a sim slice.

    A fresh 64 MiB numpy array costs its page faults on first touch, several times the copy
    itself; like CuPy's pool on a GPU, a buffer goes back to the pool once the array and every
    view of it are gone, and the next array of that size class reuses its already-mapped pages.
    """

    def __init__(self, keep_bytes: int = 2 * 2**30) -> None:
        self.keep_bytes = keep_bytes
        self.free: dict[int, list[mmap.mmap]] = {}
        self.kept = 0
        self.lock = threading.Lock()

    @staticmethod
    def _size_class(nbytes: int) -> int:
        page = mmap.PAGESIZE
        return max(page, (nbytes + page - 1) // page * page)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        import numpy

        dtype = numpy.dtype(dtype)
        nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
        if nbytes < 1 << 20:  # small arrays: malloc is cheap
            return numpy.empty(shape, dtype=dtype)
        size = self._size_class(nbytes)
        with self.lock:
            bucket = self.free.get(size)
            buffer = bucket.pop() if bucket else None
            if buffer is not None:
                self.kept -= size
        if buffer is None:
            buffer = mmap.mmap(-1, size)
        flat = numpy.frombuffer(buffer, dtype=dtype, count=nbytes // dtype.itemsize)
        # The finalizer goes on the array whose base is the buffer: every view (the reshape
        # returned here, and whatever the user slices from it) keeps that one alive.
        weakref.finalize(flat, self._give_back, buffer, size)
        return flat.reshape(shape)

    def _give_back(self, buffer: mmap.mmap, size: int) -> None:
        with self.lock:
            if self.kept + size <= self.keep_bytes:
                self.free.setdefault(size, []).append(buffer)
                self.kept += size


NOT_READY = 600  # cudaErrorNotReady (and hipErrorNotReady): a stream's work still runs


@dataclass
class Runtime:
    """The slice's array module and the copy/compute primitives the data plane needs.

    On a GPU slice copies run on a non-blocking copy stream and functions on a non-blocking
    compute stream (with pinned arena memory, so they overlap); on a sim slice both are plain
    NumPy copies and calls.
    """

    name: str
    xp: ModuleType
    warm_seconds: float
    device: dict[str, Any] = field(default_factory=dict)
    copy_stream: Any = None
    compute_stream: Any = None
    # The compute stream's state in one C call (``cudaStreamQuery``): 0 done, NOT_READY
    # working, anything else the error its work met. CuPy's ``Stream.done`` is the same call
    # but only says "not done" for an error, which a poll would wait on for ever.
    compute_query: Callable[[], int] | None = None
    sim_pool: SimMemoryPool = field(default_factory=lambda: SimMemoryPool())
    sim_cap: SimMemoryCap | None = None  # set on sim slices by warm_start

    def memory_used(self) -> int:
        """Bytes of device memory this executor holds (CuPy pool; sim: the data plane counts)."""
        if self.name == "cupy":
            return int(self.xp.get_default_memory_pool().used_bytes())
        return 0

    def follow_home(self, home: str) -> str | None:
        """After the executor became its holder (multi-user): CuPy compiles new kernels into
        the holder's own cache (``$CUPY_CACHE_DIR``, else ``~/.cupy/kernel_cache`` of the new
        HOME; a private temp dir if that cannot be made), not the one it chose at import under
        the broker's HOME, which the holder cannot write. Returns the directory (None on sim).

        CuPy (14) fixes the directory in a module-level cache backend at import: that object is
        replaced by one on the new directory; earlier CuPy versions read the variable on each
        compile, which the variable alone serves."""
        if self.name != "cupy":
            return None
        import tempfile

        cache = os.environ.get("CUPY_CACHE_DIR") or os.path.join(home, ".cupy", "kernel_cache")
        try:
            os.makedirs(cache, mode=0o700, exist_ok=True)
            if not os.access(cache, os.W_OK):
                raise PermissionError(cache)
        except OSError:
            cache = tempfile.mkdtemp(prefix="mig-kernel-cupy-")
        os.environ["CUPY_CACHE_DIR"] = cache
        from cupy.cuda import compiler

        backend = getattr(compiler, "_kernel_cache_backend", None)
        if backend is not None:
            compiler._kernel_cache_backend = type(backend)(cache)
        return cache

    def is_device_array(self, obj: Any) -> bool:
        return isinstance(obj, self.xp.ndarray)

    def pin(self, segment: Any) -> None:
        """Register an arena segment as pinned memory, once per segment (GPU only)."""
        if self.name == "cupy" and segment.size:
            import ctypes

            address = ctypes.addressof(ctypes.c_char.from_buffer(segment.map))
            self.xp.cuda.runtime.hostRegister(address, segment.size, 0)

    def to_device(self, host: Any) -> Any:
        if self.name == "numpy":
            device = self.sim_pool.empty(host.shape, host.dtype)
            numpy_copyto(device, host)
            return device.view(SimDeviceArray)  # simxp.py: how a sim slice tells device data
        with self.copy_stream:
            device = self.xp.empty(host.shape, dtype=host.dtype)
            device.set(host, stream=self.copy_stream)
        return device

    def to_device_parts(self, parts: list[Any], dtype: Any, shape: tuple[int, ...]) -> Any:
        """A device array from its bytes in consecutive parts (a tcp argument cut into frames:
        limits.ARRAY_CHUNK), each copied straight to its place: no joined host copy."""
        if self.name == "numpy":
            device = self.sim_pool.empty(shape, dtype)
        else:
            device = self.xp.empty(shape, dtype=dtype)
        flat = device.reshape(-1).view("uint8")
        at = 0
        with contextlib.nullcontext() if self.name == "numpy" else self.copy_stream:
            for part in parts:
                host = numpy_frombuffer(part, dtype="uint8")
                if self.name == "numpy":
                    numpy_copyto(flat[at : at + host.nbytes], host)
                else:
                    flat[at : at + host.nbytes].set(host, stream=self.copy_stream)
                at += host.nbytes
        return device.view(SimDeviceArray) if self.name == "numpy" else device

    def record_copy(self) -> Any:
        """An event marking that the copies issued so far are done (None on sim)."""
        if self.name == "numpy":
            return None
        event = self.xp.cuda.Event()
        event.record(self.copy_stream)
        return event

    def elapsed_ms(self, start: Any, end: Any, wall_seconds: float) -> float:
        """Time the stage-in copies took: GPU events when there are any, else wall time."""
        if self.name == "cupy" and start is not None and end is not None:  # it copied
            end.synchronize()
            return float(self.xp.cuda.get_elapsed_time(start, end))
        return wall_seconds * 1e3

    @contextlib.contextmanager
    def compute(self, ready: Any = None) -> Iterator[None]:
        """Run a function on the compute stream after its inputs' copies; wait for it."""
        if self.name == "numpy":
            yield
            return
        if ready is not None:
            self.compute_stream.wait_event(ready)
        with self.compute_stream:
            yield
        self.compute_stream.synchronize()

    def to_host(self, device: Any, target: Any) -> None:
        if self.name == "numpy":
            self.xp.copyto(target, device)
            return
        device.get(stream=self.copy_stream, out=target)
        self.copy_stream.synchronize()


def _warm_numpy() -> tuple[ModuleType, dict[str, Any]]:
    import numpy

    probe = numpy.arange(1024, dtype=numpy.float32)
    if float((probe * 2).sum()) != 1047552.0:
        raise RuntimeError("numpy warm-up computed a wrong result")
    return numpy, {"name": "cpu (simulated slice)"}


def _warm_cupy(memory_limit: int | None) -> tuple[ModuleType, dict[str, Any]]:
    import cupy

    if memory_limit:
        cupy.get_default_memory_pool().set_limit(size=memory_limit)
    probe = cupy.arange(1024, dtype=cupy.float32)
    if float((probe * 2).sum()) != 1047552.0:  # compiles and runs a kernel, syncs
        raise RuntimeError("cupy warm-up computed a wrong result")
    props = cupy.cuda.runtime.getDeviceProperties(0)
    free, total = cupy.cuda.runtime.memGetInfo()
    return cupy, {
        "name": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "multiprocessors": props["multiProcessorCount"],
        "memory_total": int(total),
        "memory_free": int(free),
        "pool_limit": int(cupy.get_default_memory_pool().get_limit()),
    }


def warm_start(name: str, memory_limit: int | None = None) -> Runtime:
    start = time.perf_counter()
    if name == "numpy":
        xp, device = _warm_numpy()
    elif name == "cupy":
        xp, device = _warm_cupy(memory_limit)
    else:
        raise ValueError(f"unknown runtime {name!r}: expected 'numpy' or 'cupy'")
    runtime = Runtime(name=name, xp=xp, warm_seconds=time.perf_counter() - start, device=device)
    if name == "numpy":  # device arrays of their own type, allocated from the pool (simxp.py)
        runtime.xp = SimXP(xp, runtime.sim_pool.empty)
    if name == "cupy":
        runtime.copy_stream = xp.cuda.Stream(non_blocking=True)
        runtime.compute_stream = xp.cuda.Stream(non_blocking=True)
        runtime.compute_query = _stream_query(xp, runtime.compute_stream)
    else:
        runtime.sim_cap = SimMemoryCap()
    return runtime


def _stream_query(xp: ModuleType, stream: Any) -> Callable[[], int]:
    """``cudaStreamQuery`` of ``stream`` in one C call (CuPy's ``runtime.streamQuery`` returns
    the status), checked once on the idle stream. A CuPy without it, or whose query raises,
    gets the query by ``Stream.done`` (``NOT_READY`` until done), as the wait was before."""
    query = getattr(xp.cuda.runtime, "streamQuery", None)
    if query is not None:
        bound = functools.partial(query, stream.ptr)
        try:
            if bound() == 0:
                return bound
        except Exception:  # (a CuPy whose query checks the status and raises)
            pass
    return lambda: 0 if stream.done else NOT_READY
