"""The executor's data plane: stage-in and stage-out on the socket thread, compute on the
**runner** thread.

The socket thread (server.py) stages an invocation as it arrives (unpickles it, copying arena
-> device on the copy stream) and hands its id to the runner over an inproc socket; the runner
calls the function on the compute stream and sends the result back through another inproc
socket (a ZeroMQ socket belongs to one thread). So the stage-in of invocation n+1 overlaps the
compute of n, and the fast path crosses threads only twice. Fetches (device -> arena) run on
the socket thread too.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import zmq

from ..wire import payload
from ..wire.arena import ArenaMap
from .runtime import Runtime

OUTBOX = "inproc://executor-outbox"
RUNNER = "inproc://executor-runner"


class UnknownHandle(KeyError):
    """A handle id this executor does not hold (freed, or lost with a replaced executor)."""


@dataclass
class Job:
    kind: str  # "invoke" | "fetch" | "call"
    route: bytes
    call_id: str
    body: dict[str, Any]
    data: bytes = b""  # pickled (args, kwargs), or the call's arguments
    fn_data: bytes = b""  # the pickled function (empty for call-level operations)
    fn: Any = None
    staged: Any = None  # (args, kwargs) once staged
    ready_event: Any = None  # CUDA event: inputs are on the device
    input_bytes: int = 0
    copy_start: Any = None  # CUDA event before the stage-in copies
    stage_wall: float = 0.0
    started: float = field(default_factory=time.time)
    cancelled: bool = False  # the caller gave up on it before it ran


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
        self.jobs: dict[str, Job] = {}  # staged, waiting for or in the runner
        self.to_runner = context.socket(zmq.PUSH)
        self.to_runner.linger = 0
        self.to_runner.bind(RUNNER)
        self.out = self._outbox()  # the socket thread's own sender, for staging errors
        self.running: tuple[str, bytes, float] | None = None  # (call id, route, deadline)
        self.cancel_lock = threading.Lock()  # orders a cancel against the end of a call
        self.last_active = time.time()
        self.busy_seconds = 0.0  # time the runner spent in calls, for the broker's busy share
        self.kernels: dict[tuple[str, str], Any] = {}
        self.functions: OrderedDict[bytes, Any] = OrderedDict()
        self.runner = threading.Thread(target=self._runner, name="runner", daemon=True)
        self.runner.start()

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

    def reset(self) -> int:
        """Free every handle: a new process of the holder (a restarted kernel) cannot refer to
        the old one's, so they would only take memory."""
        with self.lock:
            ids = list(self.handles)
        self.free(ids)
        return len(ids)

    def cancel(self, call_id: str) -> str:
        """Give up on a call: a queued one is skipped; a running one gets KeyboardInterrupt in
        the runner thread (raised at its next Python instruction: a blocking C call, such as a
        long sleep or a synchronize, finishes first). Returns what happened."""
        job = self.jobs.get(call_id)
        if job is not None:
            job.cancelled = True
            return "queued"
        with self.cancel_lock:
            if self.running is not None and self.running[0] == call_id:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.runner.ident or 0), ctypes.py_object(KeyboardInterrupt)
                )
                return "running"
        return "unknown"

    def _end_running(self) -> None:
        """The call is over: no cancel may interrupt the runner from now on, and one that was
        raised but not yet delivered is withdrawn."""
        while True:
            try:
                with self.cancel_lock:
                    self.running = None
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(self.runner.ident or 0), None
                    )
                return
            except KeyboardInterrupt:  # delivered just before the lock: it is spent
                continue

    # ---------------------------------------------------------------- socket thread
    def submit(self, job: Job) -> None:
        """Stage an invocation now and queue it for the runner; errors go to the caller."""
        try:
            if job.fn_data:
                job.fn = self._function(job.fn_data)
            job.copy_start = self.runtime.record_copy()
            job.stage_wall = time.perf_counter()
            job.staged = payload.loads(job.data, lambda pid, job=job: self._stage_in(job, pid))
            job.ready_event = self.runtime.record_copy()
            job.stage_wall = time.perf_counter() - job.stage_wall
        except BaseException as exc:
            self._release(job.input_bytes)
            self._error(self.out, job, exc)
            return
        self.jobs[job.call_id] = job
        self.to_runner.send_string(job.call_id)

    def _function(self, data: bytes) -> Any:
        """Unpickle a function, or take it from the cache: the same bytes are the same function
        (cloudpickle captured its globals by value when the client pickled it)."""
        digest = hashlib.blake2b(data, digest_size=16).digest()
        fn = self.functions.get(digest)
        if fn is None:
            fn = cloudpickle.loads(data)
            if not callable(fn):
                raise TypeError(f"the invocation's function is a {type(fn).__name__}")
            self.functions[digest] = fn
            if len(self.functions) > 256:
                self.functions.popitem(last=False)
        else:
            self.functions.move_to_end(digest)
        return fn

    def fetch(self, job: Job) -> None:
        try:
            self._fetch(job)
        except BaseException as exc:
            self._error(self.out, job, exc)
            return
        self._reply(self.out, job, "reply", {})

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
        inbox = self.context.socket(zmq.PULL)
        inbox.linger = 0
        inbox.connect(RUNNER)
        while True:
            call_id = inbox.recv_string()
            if call_id == "":
                inbox.close()
                out.close()
                return
            job = self.jobs.pop(call_id)
            if job.cancelled:
                self._release(job.input_bytes)
                self._error(out, job, KeyboardInterrupt("cancelled by the caller before it ran"))
                continue
            timeout = job.body.get("timeout")
            deadline = time.time() + float(timeout) if timeout else float("inf")
            self.running = (job.call_id, job.route, deadline)
            self.last_active = time.time()
            began = time.monotonic()
            try:
                started = time.perf_counter()
                try:
                    result = self._compute(job, out)
                finally:
                    self._end_running()
                timings = {
                    "stage_in_ms": self.runtime.elapsed_ms(
                        job.copy_start, job.ready_event, job.stage_wall
                    ),
                    "compute_ms": (time.perf_counter() - started) * 1e3,
                    "input_bytes": job.input_bytes,
                }
                job.staged = None  # inputs may die now (and go back to the pool)
                data = self._pickle_result(result)
                self._reply(out, job, "result", {"timings": timings}, data)
            except BaseException as exc:
                self._error(out, job, self._explain_memory(exc))
            finally:
                self._release(job.input_bytes)  # inputs die with the call unless returned
                self.last_active = time.time()
                self.busy_seconds += time.monotonic() - began

    def _compute(self, job: Job, out: zmq.Socket) -> Any:
        if job.kind == "call":
            return self._remote_call(job)
        fn = job.fn
        args, kwargs = job.staged
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

    def _explain_memory(self, exc: BaseException) -> BaseException:
        """CuPy's out-of-memory error, restated with the slice's cap and current use."""
        if self.runtime.name == "cupy" and isinstance(exc, MemoryError):
            limit = self.memory_limit or self.runtime.device.get("memory_total", 0)
            return MemoryError(
                f"slice memory cap exceeded: cap {limit / 2**30:.2f} GiB, in use "
                f"{self.memory_used() / 2**30:.2f} GiB ({exc})"
            )
        return exc

    def _pickle_result(self, result: Any) -> bytes:
        """Pickle a result; if that fails (an object that cannot leave this process), the whole
        result stays here as one opaque handle. Handles made by a failed attempt are dropped."""
        made: dict[int, tuple[Any, ...]] = {}  # id(obj) -> pid: the fallback pickler reuses it

        def keep(obj: Any) -> tuple[Any, ...] | None:
            pid = made.get(id(obj))
            if pid is None:
                pid = self._keep_on_device(obj)
                if pid is not None:
                    made[id(obj)] = pid
            return pid

        try:
            return payload.dumps(result, keep)
        except MemoryError:
            self.free([pid[1] for pid in made.values()])
            raise  # the result exceeds the slice's memory cap: an error, not a handle
        except Exception:
            self.free([pid[1] for pid in made.values()])
            name = f"{type(result).__module__}.{type(result).__qualname__}"
            opaque = _Opaque(self.store(result), name)
            return payload.dumps(opaque, lambda o: o.pid() if isinstance(o, _Opaque) else None)

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

    # ---------------------------------------------------------------- spill and restore
    def spill(self, directory: Path) -> dict[str, Any]:
        """Copy every handle's object to host files (arrays as .npy, other objects pickled);
        what cannot be pickled is reported lost. Called when the lease is idle."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.lock:
            handles = dict(self.handles)
        manifest: dict[str, Any] = {"next_handle": self.next_handle, "handles": {}}
        lost, total = [], 0
        for handle, obj in handles.items():
            if self.runtime.is_device_array(obj):
                host = np.empty(obj.shape, dtype=obj.dtype)
                self.runtime.to_host(obj, host)
                np.save(directory / f"{handle}.npy", host, allow_pickle=False)
                manifest["handles"][str(handle)] = "array"
                total += host.nbytes
                continue
            try:
                data = cloudpickle.dumps(obj)
            except Exception:
                lost.append(handle)
                continue
            (directory / f"{handle}.pkl").write_bytes(data)
            manifest["handles"][str(handle)] = "object"
            total += len(data)
        (directory / "manifest.json").write_text(json.dumps(manifest))
        return {"spilled": len(manifest["handles"]), "bytes": total, "lost": lost}

    def restore(self, directory: Path) -> dict[str, Any]:
        """Load what ``spill`` wrote, under the same handle ids."""
        manifest = json.loads((directory / "manifest.json").read_text())
        restored = 0
        for key, kind in manifest["handles"].items():
            handle = int(key)
            if kind == "array":
                host = np.load(directory / f"{handle}.npy", allow_pickle=False)
                self._account(host.nbytes)
                obj = self.runtime.to_device(host)
            else:
                obj = cloudpickle.loads((directory / f"{handle}.pkl").read_bytes())
            with self.lock:
                self.handles[handle] = obj
            restored += 1
        if self.runtime.copy_stream is not None:
            self.runtime.copy_stream.synchronize()
        with self.lock:
            self.next_handle = max(self.next_handle, int(manifest["next_handle"]))
        return {"restored": restored}

    def stop(self) -> None:
        self.to_runner.send_string("")


@dataclass
class _Opaque:
    handle: int
    type_name: str

    def pid(self) -> tuple[Any, ...]:
        return ("obj", self.handle, self.type_name)


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
