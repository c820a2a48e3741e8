"""The executor's data plane: stage-in, compute and stage-out of invocations on two threads.

The socket thread (server.py) only routes: an ``invoke`` or ``fetch`` is queued for the
**stager** (arena -> device copies on the copy stream, device -> arena copies for fetches), a
staged invocation is queued for the **runner** (the function on the compute stream). So the
stage-in of invocation n+1 overlaps the compute of n. Replies go back to the socket thread
through an inproc PUSH socket per thread (a ZeroMQ socket belongs to one thread).
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import numpy as np
import zmq

from ..wire import payload
from ..wire.arena import ArenaMap
from .runtime import Runtime

OUTBOX = "inproc://executor-outbox"


class UnknownHandle(KeyError):
    pass


@dataclass
class Job:
    kind: str  # "invoke" | "fetch" | "call"
    route: bytes
    call_id: str
    body: dict[str, Any]
    data: bytes = b""
    staged: Any = None  # (fn, args, kwargs) once staged
    ready_event: Any = None  # CUDA event: inputs are on the device
    input_bytes: int = 0
    started: float = field(default_factory=time.time)


class DataPlane:
    def __init__(self, runtime: Runtime, context: zmq.Context, memory_limit: int | None) -> None:
        self.runtime = runtime
        self.context = context
        self.memory_limit = memory_limit
        self.arena = ArenaMap(on_attach=runtime.pin)
        self.handles: dict[int, Any] = {}
        self.next_handle = 1
        self.lock = threading.Lock()  # guards handles and accounting between the two threads
        self.accounted = 0  # bytes of device arrays this executor holds (sim: its own cap)
        self.stage_q: queue.Queue[Job | None] = queue.Queue()
        self.run_q: queue.Queue[Job | None] = queue.Queue()
        self.running: tuple[str, bytes, float] | None = None  # (call id, route, deadline)
        self.last_active = time.time()
        self.kernels: dict[tuple[str, str], Any] = {}
        self.threads = [
            threading.Thread(target=self._stager, name="stager", daemon=True),
            threading.Thread(target=self._runner, name="runner", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    # ---------------------------------------------------------------- shared helpers
    def _outbox(self) -> zmq.Socket:
        sock = self.context.socket(zmq.PUSH)
        sock.linger = 1000
        sock.connect(OUTBOX)
        return sock

    def _reply(
        self, out: zmq.Socket, job: Job, kind: str, body: dict[str, Any], data: bytes = b""
    ) -> None:
        body = {"call_id": job.call_id, **body}
        out.send_pyobj((job.route, kind, body, data))

    def _error(self, out: zmq.Socket, job: Job, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            pickled = cloudpickle.dumps(exc)
            cloudpickle.loads(pickled)  # rebuildable on this side at least
        except Exception:
            pickled = b""
        self._reply(
            out,
            job,
            "error",
            {
                "type": type(exc).__name__,
                "module": type(exc).__module__,
                "message": str(exc),
                "traceback": tb,
            },
            pickled,
        )

    def memory_used(self) -> int:
        if self.runtime.name == "cupy":
            return self.runtime.memory_used()
        return self.accounted

    def _account(self, nbytes: int) -> None:
        """Reserve device memory on a slice whose cap the executor enforces itself (sim)."""
        if self.runtime.name == "cupy" or self.memory_limit is None:
            return
        with self.lock:
            if self.accounted + nbytes > self.memory_limit:
                raise MemoryError(
                    f"slice memory cap exceeded: cap {self.memory_limit / 2**30:.2f} GiB, in use "
                    f"{self.accounted / 2**30:.2f} GiB, this needs {nbytes / 2**30:.2f} GiB more"
                )
            self.accounted += nbytes

    def _release(self, nbytes: int) -> None:
        if self.runtime.name != "cupy":
            with self.lock:
                self.accounted = max(0, self.accounted - nbytes)

    def store(self, obj: Any) -> int:
        with self.lock:
            handle = self.next_handle
            self.next_handle += 1
            self.handles[handle] = obj
        return handle

    def lookup(self, handle: int) -> Any:
        with self.lock:
            try:
                return self.handles[handle]
            except KeyError:
                raise UnknownHandle(
                    f"handle {handle} is not on this executor (freed, or lost when the executor "
                    "was replaced)"
                ) from None

    def free(self, ids: list[int]) -> None:
        for handle in ids:
            with self.lock:
                obj = self.handles.pop(handle, None)
            if obj is not None and self.runtime.is_device_array(obj):
                self._release(int(obj.nbytes))

    # ---------------------------------------------------------------- stager thread
    def _stager(self) -> None:
        out = self._outbox()
        while True:
            job = self.stage_q.get()
            if job is None:
                return
            try:
                if job.kind == "fetch":
                    self._fetch(job)
                    self._reply(out, job, "reply", {})
                    continue
                job.staged = payload.loads(job.data, lambda pid, job=job: self._stage_in(job, pid))
                job.ready_event = self.runtime.record_copy()
                self.run_q.put(job)
            except BaseException as exc:
                self._release(job.input_bytes)
                self._error(out, job, exc)

    def _stage_in(self, job: Job, pid: tuple[Any, ...]) -> Any:
        kind = pid[0]
        if kind == "arr":
            _, segment, offset, nbytes, dtype, shape = pid
            self._account(nbytes)
            job.input_bytes += nbytes
            host = np.frombuffer(self.arena.view(segment, offset, nbytes), dtype=dtype)
            return self.runtime.to_device(host.reshape(shape))
        if kind in ("h", "obj"):
            return self.lookup(int(pid[1]))
        raise ValueError(f"unknown persistent id {kind!r}")

    def _fetch(self, job: Job) -> None:
        for handle, segment, offset, nbytes in job.body["items"]:
            obj = self.lookup(int(handle))
            if not self.runtime.is_device_array(obj) or int(obj.nbytes) != nbytes:
                raise ValueError(f"handle {handle} is not a device array of {nbytes} bytes")
            if nbytes:
                target = np.frombuffer(self.arena.view(segment, offset, nbytes), dtype=obj.dtype)
                self.runtime.to_host(obj, target.reshape(obj.shape))

    # ---------------------------------------------------------------- runner thread
    def _runner(self) -> None:
        out = self._outbox()
        while True:
            job = self.run_q.get()
            if job is None:
                return
            timeout = job.body.get("timeout")
            deadline = time.time() + float(timeout) if timeout else float("inf")
            self.running = (job.call_id, job.route, deadline)
            self.last_active = time.time()
            try:
                result = self._compute(job, out)
                data = payload.dumps(result, self._keep_on_device)
                self._reply(out, job, "result", {}, data)
            except BaseException as exc:
                self._error(out, job, exc)
            finally:
                self._release(job.input_bytes)  # inputs die with the call unless returned
                self.running = None
                self.last_active = time.time()

    def _compute(self, job: Job, out: zmq.Socket) -> Any:
        if job.kind == "call":
            return self._remote_call(job)
        fn, args, kwargs = job.staged
        globals_ = getattr(fn, "__globals__", None)
        if isinstance(globals_, dict) and "xp" not in globals_:
            globals_["xp"] = self.runtime.xp
        stdout = _Stream(out, job, "stdout")
        stderr = _Stream(out, job, "stderr")
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                with self.runtime.compute(job.ready_event):
                    return fn(*args, **kwargs)
            finally:
                stdout.flush()
                stderr.flush()

    def _keep_on_device(self, obj: Any) -> tuple[Any, ...] | None:
        """Results: device arrays and device-resident objects stay here as handles."""
        if self.runtime.is_device_array(obj):
            nbytes = int(obj.nbytes)
            self._account(nbytes)
            return ("h", self.store(obj), tuple(obj.shape), np.dtype(obj.dtype), nbytes)
        module = type(obj).__module__ or ""
        if module.startswith("torch") or module.startswith("cupy"):
            return ("obj", self.store(obj), f"{module}.{type(obj).__qualname__}")
        return None

    # ---------------------------------------------------------------- call-level remoting
    def _remote_call(self, job: Job) -> Any:
        op = job.body["op"]
        args = job.staged
        if op == "alloc":
            shape, dtype = args
            self._account(int(np.prod(shape)) * np.dtype(dtype).itemsize)
            return self.runtime.xp.zeros(shape, dtype=dtype)
        if op == "put":
            (array,) = args
            return array
        if op == "launch":
            source, name, grid, block, kernel_args = args
            if self.runtime.name != "cupy":
                raise RuntimeError(
                    "launch needs a GPU slice: CUDA C kernels cannot run on a simulated slice"
                )
            key = (source, name)
            kernel = self.kernels.get(key)
            if kernel is None:
                kernel = self.runtime.xp.RawKernel(source, name)
                self.kernels[key] = kernel
            with self.runtime.compute(job.ready_event):
                kernel(tuple(grid), tuple(block), tuple(kernel_args))
            return None
        raise ValueError(f"unknown call {op!r}")

    def stop(self) -> None:
        self.stage_q.put(None)
        self.run_q.put(None)


class _Stream(io.TextIOBase):
    """sys.stdout/stderr of a running function: lines go to the caller while it runs."""

    def __init__(self, out: zmq.Socket, job: Job, name: str) -> None:
        self.out, self.job, self.name = out, job, name
        self.buffer_: list[str] = []
        self.last = time.monotonic()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buffer_.append(text)
        if "\n" in text or time.monotonic() - self.last > 0.1:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self.buffer_:
            text, self.buffer_ = "".join(self.buffer_), []
            self.out.send_pyobj(
                (
                    self.job.route,
                    "stream",
                    {"call_id": self.job.call_id, "name": self.name, "text": text},
                    b"",
                )
            )
        self.last = time.monotonic()


__all__ = ["OUTBOX", "DataPlane", "Job", "UnknownHandle"]
