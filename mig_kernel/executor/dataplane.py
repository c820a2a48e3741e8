"""The executor's data plane: staging, calls, results, handles, fetch, spill and restore.

Two threads share one ROUTER socket, never at the same time: whoever holds the server's socket
lock serves it (server.py). The **main** thread serves requests and runs the calls; when a call
has run for a couple of milliseconds the **watcher** thread takes the socket over until it
ends, so a long call still has its stage-in of the next invocation overlapped, its output
streamed, its cancel and timeout served. A short call crosses no thread at all: the thread that
received the invocation runs it and sends its result.

Array data comes either from the client's arena (``arr`` descriptors, ipc executors) or from
extra frames of the invocation itself (``buf``, tcp executors); a fetch names arena regions to
fill, or none, and then the arrays travel back as frames of the reply.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import itertools
import json
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import zmq

from ..wire import payload
from ..wire.arena import ArenaMap
from ..wire.messages import INLINE_BYTES
from . import simxp
from .display import DisplayBridge
from .runtime import CAP_EXCEEDED, NOT_READY, Runtime, cap_message, needed_bytes

log = logging.getLogger("mig_kernel.executor")
STREAMS = "inproc://executor-streams"  # what a running call prints, to the socket's holder
# While a call's GPU work runs, the main thread rehearses the steps that follow it every this
# many seconds (server.py, ``_rehearse``), polling the stream instead of synchronizing: after
# a long wait every step runs from cold caches, at several times its warm cost, unless it ran
# shortly before (docs/performance.md). MIG_KERNEL_REHEARSE_US overrides it (0: never).
REHEARSE = float(os.environ.get("MIG_KERNEL_REHEARSE_US", "200")) / 1e6

# (route, message type, body, payload frames): a reply to the lease holder, sent by the thread
# that holds the socket
Sender = Callable[[bytes, str, dict[str, Any], Sequence[Any]], None]
Reply = tuple[str, dict[str, Any], tuple[Any, ...]]  # (message type, body, payload frames)
_PLAIN = (type(None), bool, int, float, complex, str, bytes)  # results that hold no handle
# Libraries whose objects hold host data only: on a GPU they refuse CuPy arrays, so on a sim
# slice a device array found inside one of their objects comes back as host data, as the GPU
# run (after the .get() it would have needed) gives it. See ``_keep_on_device``.
HOST_LIBRARIES = frozenset(
    "pandas matplotlib scipy sklearn PIL xarray polars pyarrow seaborn statsmodels IPython".split()  # noqa: SIM905
)


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
    buffers: Sequence[Any] = ()  # array data carried by the message itself (tcp: "buf" ids)
    argv: Any = None  # (args, kwargs) as a lane carried them, when they are plain values
    handles: list[int | str] | None = None  # positions in argv that hold handle numbers
    fn: Any = None
    staged: Any = None  # (args, kwargs) once staged
    ready_event: Any = None  # CUDA event: inputs are on the device
    input_bytes: int = 0
    copy_start: Any = None  # CUDA event before the stage-in copies
    stage_wall: float = 0.0
    started: float = field(default_factory=time.time)
    run_started: float = 0.0  # monotonic, once it runs (the watcher takes over after a while)
    deadline: float = float("inf")  # epoch seconds its timeout ends, once it runs
    cancelled: bool = False  # the caller gave up on it before it ran
    rehearsals: int = 0  # how often what follows it was rehearsed while its GPU work ran


class DataPlane:
    def __init__(
        self, runtime: Runtime, context: zmq.Context, memory_limit: int | None, send: Sender
    ) -> None:
        self.runtime = runtime
        self.send = send  # only while holding the socket: staging errors, fetch replies
        self.memory_limit = memory_limit
        self.arena = ArenaMap(on_attach=runtime.pin)
        self.handles: dict[int, Any] = {}
        self.next_handle = 1
        self.lock = threading.Lock()  # guards handles and accounting between the two threads
        self.accounted = 0  # bytes of device arrays this executor holds (sim: its own cap)
        self.jobs: dict[str, Job] = {}  # staged, not yet running (a cancel finds them here)
        self.ready: deque[Job] = deque()  # the same, in order
        self.streams = context.socket(zmq.PUSH)  # bound by the server before we connect
        self.streams.linger = 0
        self.streams.connect(STREAMS)
        self.stream_lock = threading.Lock()  # a call's own threads may print too
        self.stdout = _Stream(self, "stdout", sys.stdout)
        self.stderr = _Stream(self, "stderr", sys.stderr)
        self.current: Job | None = None  # the call running now
        self.runner_ident = threading.get_ident()  # the thread that runs calls (cancel)
        self.call_started: Callable[[], None] = lambda: None  # the server wakes its watcher
        # The server's, while a call waits (its argument: is the GPU work still running?)
        self.rehearse: Callable[[Callable[[], bool]], None] | None = None
        self.awaiting = False  # in ``_await``: rehearsing while a call's GPU work runs
        self.cancel_lock = threading.Lock()  # orders a cancel against the end of a call
        self.interrupting = False  # a cancel raised KeyboardInterrupt in the running call
        self.streamed = 0  # stream messages queued so far (the result waits for them)
        self.last_active = time.time()
        self.busy_seconds = 0.0  # time spent in calls, for the broker's busy share
        self.kernels: dict[tuple[str, str], Any] = {}
        self.last_copy: Any = None  # CUDA event after the latest call's stage-in copies
        self.functions: OrderedDict[bytes, Any] = OrderedDict()
        self.display = DisplayBridge(self._publish_display)  # rich output (display.py)

    def close(self) -> None:
        """Close the output socket and undo the process-wide settings (sys.stdout/stderr,
        display's shell): a data plane inside another process (tests, probes) leaves it as
        it found it."""
        self.streams.close(linger=0)
        self.display.close()
        if sys.stdout is self.stdout:
            sys.stdout = self.stdout.fallback
        if sys.stderr is self.stderr:
            sys.stderr = self.stderr.fallback

    # ---------------------------------------------------------------- shared helpers
    def _error_reply(self, job: Job, exc: BaseException) -> Reply:
        tb = "".join(_hide_frames(traceback.TracebackException.from_exception(exc)).format())
        try:
            pickled = cloudpickle.dumps(exc)
            cloudpickle.loads(pickled)  # rebuildable on this side at least
        except Exception:
            pickled = b""
        body = {
            "call_id": job.call_id,
            "type": type(exc).__name__,
            "module": type(exc).__module__,
            "message": str(exc),
            "traceback": tb,
        }
        return "error", body, (pickled,) if pickled else ()

    def _send_error(self, job: Job, exc: BaseException) -> None:
        self.send(job.route, *self._error_reply(job, exc))

    def stream(self, job: Job, name: str, text: str) -> None:
        """Output of a running call, queued for whichever thread holds the socket."""
        self._queue(job, "stream", {"call_id": job.call_id, "name": name, "text": text})

    def _queue(self, job: Job, kind: str, body: dict[str, Any]) -> None:
        with self.stream_lock:
            self.streams.send_pyobj((job.route, kind, body))
            self.streamed += 1

    def _publish_display(self, kind: str, content: dict[str, Any]) -> None:
        """A display of the running call (display.py), after what it printed so far: the
        caller replays both in the order they happened. Outside a call (a thread the user
        left running) there is no one to show it to."""
        job = self.current
        if job is None:
            return
        self.stdout.flush()
        self.stderr.flush()
        self._queue(job, "display", {"call_id": job.call_id, "kind": kind, **content})

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
                raise MemoryError(cap_message(self.memory_limit, self.accounted, nbytes))
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
                raise _not_held(handle) from None

    def lookup_at(
        self, argv: tuple[tuple[Any, ...], dict[str, Any]], positions: list[int | str]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A lane request's (args, kwargs) with the handle numbers at ``positions`` (server.py
        checked them: indexes into args, keywords) replaced by what they name, under one
        taking of the lock."""
        args, kwargs = list(argv[0]), dict(argv[1]) if argv[1] else argv[1]
        handles = self.handles
        with self.lock:
            for at in positions:
                number = args[at] if type(at) is int else kwargs[at]  # type: ignore[index]
                obj = handles.get(number, _NOT_HELD)
                if obj is _NOT_HELD:
                    raise _not_held(number)
                if type(at) is int:
                    args[at] = obj
                else:
                    kwargs[at] = obj  # type: ignore[index]
        return tuple(args), kwargs

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
        the thread running it (raised at its next Python instruction: a blocking C call, such
        as a long sleep or a synchronize, finishes first). Returns what happened."""
        job = self.jobs.get(call_id)
        if job is not None:
            job.cancelled = True
            return "queued"
        with self.cancel_lock:
            current = self.current
            if current is not None and current.call_id == call_id:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.runner_ident), ctypes.py_object(KeyboardInterrupt)
                )
                self.interrupting = True
                return "running"
        return "unknown"

    def _end_running(self) -> None:
        """The call is over: no cancel may interrupt the runner from now on, and one that was
        raised but not yet delivered is withdrawn."""
        while True:
            try:
                with self.cancel_lock:
                    self.current = None
                    if self.interrupting:
                        self.interrupting = False
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(
                            ctypes.c_ulong(self.runner_ident), None
                        )
                return
            except KeyboardInterrupt:  # delivered just before the lock: it is spent
                continue

    # ---------------------------------------------------------------- staging
    def submit(self, job: Job) -> None:
        """Stage an invocation now and queue it to run; errors go to the caller."""
        try:
            if job.fn_data:
                job.fn = self.function(job.fn_data)
            job.stage_wall = time.perf_counter()
            if job.argv is not None:  # plain values, as the lane brought them
                job.staged = (
                    self.lookup_at(job.argv, job.handles)
                    if job.handles  # handle numbers (server.py checked their positions)
                    else job.argv
                )
            elif job.data == payload.EMPTY_ARGS:  # a call without arguments: nothing to load
                job.staged = ((), {})
            else:
                job.staged = payload.loads(job.data, lambda pid, job=job: self._stage_in(job, pid))
            if job.copy_start is not None:  # it copied inputs: its compute waits for them
                copied = self.runtime.record_copy()
                with self.lock:  # (``_waited_for``)
                    job.ready_event = self.last_copy = copied
            else:  # none: it still waits for the last copies issued (a put's, say), which
                job.ready_event = self.last_copy  # costs no new event and no timing read
            job.stage_wall = time.perf_counter() - job.stage_wall
        except BaseException as exc:
            self._release(job.input_bytes)
            self._send_error(job, exc)
            return
        self.queue(job)

    def queue(self, job: Job) -> None:
        """Queue a staged invocation to run (a cancel finds it from now on)."""
        self.jobs[job.call_id] = job
        self.ready.append(job)

    def next_ready(self) -> Job | None:
        """The oldest staged invocation, taken off the queue (None if there is none)."""
        if not self.ready:
            return None
        job = self.ready.popleft()
        self.jobs.pop(job.call_id, None)
        return job

    def function(self, data: bytes, load: bool = True, use: bool = False) -> Any:
        """Unpickle a function, or take it from the cache: the same bytes are the same function
        (cloudpickle captured its globals by value when the client pickled it). Without
        ``load``, only the look-up (None if it is not cached; the cache's order is kept, or,
        with ``use``, a hit counts as a use, as it does with ``load``)."""
        # Keyed by a small pickle itself (no digest per call), by a digest of a large one (or
        # of a frame received in place, which is no key).
        key = (
            data
            if type(data) is bytes and len(data) <= INLINE_BYTES
            else hashlib.blake2b(data, digest_size=16).digest()
        )
        fn = self.functions.get(key)
        if not load:
            if use and fn is not None:
                self.functions.move_to_end(key)
            return fn
        if fn is None:
            fn = cloudpickle.loads(data)
            if not callable(fn):
                raise TypeError(f"the invocation's function is a {type(fn).__name__}")
            self.functions[key] = fn
            if len(self.functions) > 256:
                self.functions.popitem(last=False)
        else:
            self.functions.move_to_end(key)
        return fn

    def fetch(self, job: Job) -> None:
        try:
            frames = self._fetch(job)
        except BaseException as exc:
            self._send_error(job, exc)
            return
        self.send(job.route, "reply", {"call_id": job.call_id}, frames)

    def _stage_in(self, job: Job, pid: tuple[Any, ...]) -> Any:
        kind = pid[0]
        if kind == "arr":
            _, segment, offset, nbytes, dtype, shape = pid
            return self._to_device(job, self.arena.view(segment, offset, nbytes), dtype, shape)
        if kind == "buf":
            _, index, dtype, shape = pid
            return self._to_device(job, _buffer(job, index, join=False), dtype, shape)
        if kind in ("h", "obj"):
            return self.lookup(int(pid[1]))
        if kind == "host" and len(pid) == 2 and isinstance(pid[1], tuple):
            return self._to_host_copy(job, pid[1])
        raise ValueError(f"unknown persistent id {kind!r}")

    def _to_host_copy(self, job: Job, inner: tuple[Any, ...]) -> Any:
        """An argument that arrives as host data (numpy), not staged to the device: a copy,
        since the arena region it came in is the caller's again once the call ends."""
        if inner[0] == "arr":
            _, segment, offset, nbytes, dtype, shape = inner
            data = self.arena.view(segment, offset, nbytes)
        elif inner[0] == "buf":
            _, index, dtype, shape = inner
            data = _buffer(job, index)
        else:
            raise ValueError(f"unknown host array id {inner[0]!r}")
        dtype, shape = np.dtype(dtype), tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(data) != nbytes:
            raise ValueError(f"array of {shape} {dtype} needs {nbytes} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()

    def _to_device(self, job: Job, data: Any, dtype: Any, shape: Any) -> Any:
        """An argument's bytes (arena region or message frame, or a list of frames) as a
        device array."""
        dtype, shape = np.dtype(dtype), tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        got = sum(len(part) for part in data) if isinstance(data, list) else len(data)
        if got != nbytes:
            raise ValueError(f"array of {shape} {dtype} needs {nbytes} bytes, got {got}")
        self._account(nbytes)
        job.input_bytes += nbytes
        if job.copy_start is None:  # the first copy of this call: time them from here
            job.copy_start = self.runtime.record_copy()
        if isinstance(data, list):
            return self.runtime.to_device_parts(data, dtype, shape)
        return self.runtime.to_device(np.frombuffer(data, dtype=dtype).reshape(shape))

    def _fetch(self, job: Job) -> list[memoryview]:
        """Copy device arrays to the host: into the arena regions the items name (ipc), or into
        fresh host arrays returned as reply frames (items of [handle, nbytes]: tcp)."""
        frames = []
        for item in job.body["items"]:
            handle, nbytes = item[0], item[-1]
            obj = self.lookup(int(handle))
            if not self.runtime.is_device_array(obj) or int(obj.nbytes) != nbytes:
                raise ValueError(f"handle {handle} is not a device array of {nbytes} bytes")
            if len(item) == 2:
                host = np.empty(obj.shape, dtype=obj.dtype)
                self.runtime.to_host(obj, host)
                frames.append(memoryview(host.reshape(-1).view(np.uint8)))
            elif nbytes:
                _, segment, offset, _ = item
                target = np.frombuffer(self.arena.view(segment, offset, nbytes), dtype=obj.dtype)
                self.runtime.to_host(obj, target.reshape(obj.shape))
        return frames

    # ---------------------------------------------------------------- running a call
    def run(self, job: Job) -> Reply:
        """Run a staged invocation on this thread; returns its result or error message (the
        caller sends it once it holds the socket)."""
        if job.cancelled:
            self._release(job.input_bytes)
            return self._error_reply(
                job, KeyboardInterrupt("cancelled by the caller before it ran")
            )
        timeout = job.body.get("timeout")
        if timeout:
            job.deadline = time.time() + float(timeout)
        job.run_started = began = time.monotonic()
        self.current = job
        self.call_started()
        self.last_active = time.time()
        try:
            started = time.perf_counter()
            try:
                result = self._compute(job)
            finally:
                self._end_running()
            timings = {
                "stage_in_ms": self.runtime.elapsed_ms(
                    job.copy_start, job.ready_event, job.stage_wall
                )
                if job.copy_start is not None
                else job.stage_wall * 1e3,
                "compute_ms": (time.perf_counter() - started) * 1e3,
                "input_bytes": job.input_bytes,
            }
            if job.rehearsals:
                timings["rehearsals"] = job.rehearsals
            job.staged = None  # inputs may die now (and go back to the pool)
            body = {"call_id": job.call_id, "timings": timings}
            if type(result) in _PLAIN and type(job.route) is str:
                # A lane's message is a pickle already: a plain value goes in it as it is
                # (the server pickles it for ZeroMQ if the lane breaks on the way).
                body["value"] = result
                return "result", body, ()
            data = self._pickle_result(result)
            if len(data) <= INLINE_BYTES:  # in the header: one frame fewer
                body["data"] = data
                return "result", body, ()
            return "result", body, (data,)
        except BaseException as exc:
            return self._error_reply(job, self._explain_memory(exc))
        finally:
            if job.input_bytes:
                self._release(job.input_bytes)  # inputs die with the call unless returned
            self.last_active = time.time()
            self.busy_seconds += time.monotonic() - began

    def _compute(self, job: Job) -> Any:
        if job.kind == "call":
            return self._remote_call(job)
        fn = job.fn
        args, kwargs = job.staged
        globals_ = getattr(fn, "__globals__", None)
        if isinstance(globals_, dict) and "xp" not in globals_:
            globals_["xp"] = self.runtime.xp
        # The streams stay installed between calls (they pass output through to the log then)
        # and take the call's output while it runs: cheaper than redirecting for every call.
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.stdout.attach(job)
        self.stderr.attach(job)
        trace = job.body.get("trace")  # MIG_KERNEL_TRACE stamps (server.py)
        try:
            stream = self.runtime.compute_stream
            if stream is None:  # a sim slice: its memory cap instead of a stream
                cap, restore = self.runtime.sim_cap, None
                if cap is not None and self.memory_limit is not None:
                    with self.lock:
                        room = self.memory_limit - self.accounted
                    restore = cap.begin(room)
                try:
                    result = fn(*args, **kwargs)
                finally:
                    if restore is not None:
                        cap.end(restore)  # type: ignore[union-attr]
                if trace is not None:
                    trace.append(time.perf_counter_ns())
            else:  # on the compute stream, after its inputs' copies; then wait for it
                if job.ready_event is not None:
                    stream.wait_event(job.ready_event)
                    self._waited_for(job.ready_event)
                with stream:
                    result = fn(*args, **kwargs)
                if trace is not None:
                    trace.append(time.perf_counter_ns())  # launched
                query = self.runtime.compute_query
                if REHEARSE > 0 and self.rehearse is not None and query is not None:
                    job.rehearsals = self._await(stream, query)
                else:
                    stream.synchronize()
            if trace is not None:
                trace.append(time.perf_counter_ns())  # synchronized
            return result
        finally:
            # As at the end of a cell: figures the call made are shown (and closed) now,
            # before its result is pickled and while its output still goes to the caller.
            self.display.after_call()
            self.stdout.detach()
            self.stderr.detach()

    def _await(self, stream: Any, query: Callable[[], int]) -> int:
        """``stream.synchronize()``, rehearsing what follows every ``REHEARSE`` seconds while
        the stream works (``rehearse``: the server's); returns how often. The thread polls
        the stream (``query``: its state, runtime.py ``compute_query``), as CUDA's own
        synchronize spins on its work; each rehearsal also lets other threads run (the
        watcher, the call's own). Work that ended well needs no synchronize after the poll
        (one driver call fewer per call); work that failed ends the poll at once, and the
        synchronize raises its error. A rehearsal that fails is a bug: it is logged once and
        rehearsals stop (``rehearse`` becomes None); the call goes on."""
        rehearse, clock = self.rehearse, time.perf_counter
        due = clock() + REHEARSE
        count = 0

        def working() -> bool:
            return query() == NOT_READY

        self.awaiting = True
        try:
            status = query()
            while status == NOT_READY and rehearse is not None:
                if clock() >= due:
                    try:
                        rehearse(working)
                        count += 1
                    except Exception:
                        log.exception("rehearsing the steps after a call failed; rehearsals stop")
                        self.rehearse = rehearse = None
                    time.sleep(0)
                    due = clock() + REHEARSE
                status = query()
        finally:
            self.awaiting = False
        if status != 0:  # its error (raised by the synchronize), or no more rehearsals
            stream.synchronize()
        return count

    def _waited_for(self, event: Any) -> None:
        """The compute stream waits for ``event`` (the latest copies) from now on, in order:
        a later call without copies of its own need not make it wait again (a driver call)."""
        with self.lock:  # (the watcher thread may stage a call, and record a copy, meanwhile)
            if self.last_copy is event:
                self.last_copy = None

    def _explain_memory(self, exc: BaseException) -> BaseException:
        """An out-of-memory error of the running call (CuPy's pool limit on a GPU, the data
        limit on a sim slice), restated as the slice's cap, its use and the allocation that
        failed, in one wording for both; its traceback (the user's line) is kept."""
        if not isinstance(exc, MemoryError) or str(exc).startswith(CAP_EXCEEDED):
            return exc
        if self.runtime.name == "cupy":
            limit = self.memory_limit or self.runtime.device.get("memory_total", 0)
            used = self.memory_used()
        elif self.memory_limit is not None and self.runtime.sim_cap is not None:
            limit = self.memory_limit
            used = self.accounted + self.runtime.sim_cap.grown()
        else:
            return exc
        return MemoryError(cap_message(limit, used, needed_bytes(exc))).with_traceback(
            exc.__traceback__
        )

    def _pickle_result(self, result: Any) -> bytes:
        """Pickle a result; if that fails (an object that cannot leave this process), the whole
        result stays here as one opaque handle. Handles made by a failed attempt are dropped."""
        if type(result) in _PLAIN:  # no handle can be in it: the plain pickler says it all
            return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        return self._pickle_kept(result, {})

    def _pickle_kept(self, value: Any, made: dict[int, Any], *, host: bool = False) -> bytes:
        """``value`` pickled with its device data kept here as handles (``_keep_on_device``);
        if it cannot be pickled, it stays here as one opaque handle. ``made`` (id(obj) -> pid)
        is shared by the nested pickles of one result, so an object met twice is one handle;
        the handles of a failed attempt are dropped from it and freed."""
        mine: list[int] = []  # keys of ``made`` this attempt added

        def keep(obj: Any) -> tuple[Any, ...] | None:
            pid = made.get(id(obj))
            if pid is not None and not (host and pid[0] == "h"):  # no handle inside host data
                return pid
            pid = self._keep_on_device(obj, made, host)
            if pid is not None and pid[0] in ("h", "obj"):
                made[id(obj)] = pid
                mine.append(id(obj))
            return pid

        def drop() -> None:
            self.free([made.pop(key)[1] for key in mine])

        try:
            return payload.dumps(value, keep)
        except MemoryError:
            drop()
            raise  # the result exceeds the slice's memory cap: an error, not a handle
        except Exception:
            drop()
            name = f"{type(value).__module__}.{type(value).__qualname__}"
            opaque = _Opaque(self.store(value), name)
            return payload.dumps(opaque, lambda o: o.pid() if isinstance(o, _Opaque) else None)

    def _keep_on_device(
        self, obj: Any, made: dict[int, Any], host: bool = False
    ) -> tuple[Any, ...] | None:
        """Which objects of a result stay here, as what (payload.py lists the persistent ids):

        - device arrays (CuPy's; a sim slice's ``SimDeviceArray``): handles, ``RemoteArray``;
        - other CuPy objects, and PyTorch tensors and modules holding device memory: opaque
          handles (a CPU tensor or model is host data and is pickled);
        - a ``payload.Parts``: each value pickled on its own;
        - on a sim slice, an object of a host library (``HOST_LIBRARIES``: pandas,
          matplotlib...) is pickled on its own with ``host`` set, where a device array is
          pickled as the NumPy array it is (simxp.py): a sim device array is NumPy memory,
          and pandas or matplotlib keep what they are given, but they hold host data only, so
          no handle must ever land inside them.
        Everything else is pickled (host objects come back as themselves)."""
        kind = type(obj)
        if kind is payload.Parts:
            return (
                "parts",
                {str(k): self._pickle_kept(v, made, host=host) for k, v in obj.items()},
            )
        if self.runtime.is_device_array(obj):
            if host:
                return None  # SimDeviceArray pickles as a plain ndarray
            nbytes = int(obj.nbytes)
            self._account(nbytes)
            return ("h", self.store(obj), tuple(obj.shape), np.dtype(obj.dtype), nbytes)
        module = kind.__module__ or ""
        top = module.partition(".")[0]
        if top in ("cupy", "cupyx") or _torch_on_device(obj):
            return ("obj", self.store(obj), f"{module}.{kind.__qualname__}")
        if not host and self.runtime.name == "numpy" and top in HOST_LIBRARIES:
            return ("pickle", self._pickle_kept(obj, made, host=True))
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


_NOT_HELD = object()  # (``lookup_at``: no handle by that number)


def _not_held(handle: Any) -> UnknownHandle:
    return UnknownHandle(
        f"handle {handle} is not on this executor (freed, or lost when the executor was replaced)"
    )


# Frames a remote traceback leaves out: the sim ``xp``'s wrappers stand between the user's
# line and NumPy's (``xp.ones`` -> ``numpy.ones``), where CuPy has no Python frame of ours.
_HIDDEN_FILES = frozenset({simxp.__file__})


def _buffer(job: Job, index: Any, join: bool = True) -> Any:
    """The bytes of a ``buf`` argument: one frame, or (a list of indices) a large array's
    frames (tcp clients cut arrays into frames of limits.ARRAY_CHUNK bytes), joined, or as a
    list of frames for the device copy to take one by one."""
    indices = index if isinstance(index, list) else [index]
    for i in indices:
        if not isinstance(i, int) or not 0 <= i < len(job.buffers):
            raise ValueError(f"array buffer {i!r} is not in the message")
    if not isinstance(index, list):
        return job.buffers[index]
    if not join:
        return [job.buffers[i] for i in indices]
    joined = bytearray(sum(len(job.buffers[i]) for i in indices))
    at = 0
    for i in indices:
        part = job.buffers[i]
        joined[at : at + len(part)] = part
        at += len(part)
    return joined


def _hide_frames(report: traceback.TracebackException) -> traceback.TracebackException:
    """``report`` (and the exceptions chained to it) without the frames of ``_HIDDEN_FILES``."""
    seen: set[int] = set()
    todo = [report]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        frames = [f for f in current.stack if f.filename not in _HIDDEN_FILES]
        if len(frames) != len(current.stack):
            current.stack = traceback.StackSummary.from_list(frames)
        todo.extend(c for c in (current.__cause__, current.__context__) if c is not None)
        todo.extend(getattr(current, "exceptions", None) or ())
    return report


def _torch_on_device(obj: Any) -> bool:
    """A PyTorch tensor on a device, or a module with a parameter or buffer on one."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    if isinstance(obj, torch.Tensor):
        return bool(obj.device.type != "cpu")
    if isinstance(obj, torch.nn.Module):
        tensors = itertools.chain(obj.parameters(), obj.buffers())
        return any(t.device.type != "cpu" for t in tensors)
    return False


@dataclass
class _Opaque:
    handle: int
    type_name: str

    def pid(self) -> tuple[Any, ...]:
        return ("obj", self.handle, self.type_name)


class _Stream(io.TextIOBase):
    """sys.stdout/stderr of the executor. While a call runs, what it prints goes to the caller
    as it runs (a line at a time, or every 0.1 s); between calls, to the executor's own stream
    (its log), as before any call."""

    def __init__(self, plane: DataPlane, name: str, fallback: Any) -> None:
        self.plane, self.name, self.fallback = plane, name, fallback
        self.job: Job | None = None
        self.buffer_: list[str] = []
        self.last = 0.0

    def writable(self) -> bool:
        return True

    def attach(self, job: Job) -> None:
        self.job, self.buffer_, self.last = job, [], time.monotonic()

    def detach(self) -> None:
        if self.buffer_:
            self.flush()
        self.job = None

    def write(self, text: str) -> int:
        if self.job is None:
            return self.fallback.write(text)
        now = time.monotonic()
        if not self.buffer_:
            self.last = now  # the age of what waits counts, not the quiet before it
        self.buffer_.append(text)
        if "\n" in text or now - self.last > 0.1:
            self.flush()
        return len(text)

    def flush(self) -> None:
        job = self.job
        if job is None:
            self.fallback.flush()
            return
        if self.buffer_:
            text, self.buffer_ = "".join(self.buffer_), []
            self.plane.stream(job, self.name, text)
        self.last = time.monotonic()


__all__ = ["STREAMS", "DataPlane", "Job", "UnknownHandle"]
