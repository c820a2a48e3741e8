"""The array runtime of a slice and its warm start.

A GPU slice runs CuPy, a sim slice NumPy; functions see either as ``xp``. Warm start does, before
the executor reports ready, everything a first call would otherwise pay for: import, context
creation, and compiling and running a tiny kernel (about 2.4 s on an H100 when cold).
"""

from __future__ import annotations

import contextlib
import mmap
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


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
    sim_pool: SimMemoryPool = field(default_factory=lambda: SimMemoryPool())

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
        import os
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
            self.xp.copyto(device, host)
            return device
        with self.copy_stream:
            device = self.xp.empty(host.shape, dtype=host.dtype)
            device.set(host, stream=self.copy_stream)
        return device

    def record_copy(self) -> Any:
        """An event marking that the copies issued so far are done (None on sim)."""
        if self.name == "numpy":
            return None
        event = self.xp.cuda.Event()
        event.record(self.copy_stream)
        return event

    def elapsed_ms(self, start: Any, end: Any, wall_seconds: float) -> float:
        """Time the stage-in copies took: GPU events when there are any, else wall time."""
        if self.name == "cupy" and start is not None and end is not None:
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
    if name == "cupy":
        runtime.copy_stream = xp.cuda.Stream(non_blocking=True)
        runtime.compute_stream = xp.cuda.Stream(non_blocking=True)
    return runtime
