"""The client side of the data plane: invocations, their futures, and handles to data that
stays on the slice.

One ``ExecutorConnection`` per Session: a DEALER to the lease's executor, and the way array
data travels to it (datapath.py: the lease's arena for an ipc executor, the messages themselves
for a tcp one; the endpoint's scheme says which).
There is no background thread: whoever waits for a result receives for everyone (under the
connection's lock), resolving other calls' futures and printing streamed output as it arrives.
While waiting it checks every quarter second that the executor process still exists, so a
dead executor is reported within a second instead of after the call's timeout.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from .datapath import ArenaPath, DataPath, Outgoing, SocketPath
from .procs import pid_alive
from .wire import payload
from .wire.arena import Arena
from .wire.errors import (
    AuthenticationError,
    ExecutorUnavailable,
    error_from_code,
)
from .wire.messages import INLINE_BYTES, Message, decode, encode, refusal_reason
from .wire.transport import TCP, connect, received, send_frames, transport_of

POLL_SLICE = 0.25  # seconds between executor liveness checks while waiting
CANCEL_GRACE = 3.0  # seconds an interrupted wait gives the executor to stop the call


class ExecutorLost(ExecutorUnavailable):
    """The executor died (killed, crashed, timed out): this lease's device data is gone."""

    code = "executor_lost"


class RemoteError(Exception):
    """An exception raised by the function on the slice whose type could not be rebuilt here."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class RemoteArray:
    """A device array that stays on the slice. Shape, dtype and size are known here; ``get()``
    copies it to the host; passing it to a later call moves no data."""

    def __init__(
        self,
        conn: ExecutorConnection,
        handle: int,
        shape: tuple[int, ...],
        dtype: np.dtype,
        nbytes: int,
    ) -> None:
        self._route = conn.route
        self.handle = handle
        self.epoch = conn.epoch
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(nbytes)
        self._finalizer = weakref.finalize(self, conn.route.release, handle, conn.epoch)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def get(self) -> np.ndarray:
        """A host (numpy) copy of the array."""
        return self._route.current().fetch([self])[0]

    def free(self) -> None:
        """Free the device memory now (otherwise it is freed when this handle is collected)."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"RemoteArray(shape={self.shape}, dtype={self.dtype}, handle={self.handle})"


class RemoteObject:
    """Any other object that lives on the slice (a PyTorch model or tensor, a CuPy plan)."""

    def __init__(self, conn: ExecutorConnection, handle: int, type_name: str) -> None:
        self._route = conn.route
        self.handle = handle
        self.epoch = conn.epoch
        self.type_name = type_name
        self._finalizer = weakref.finalize(self, conn.route.release, handle, conn.epoch)

    def free(self) -> None:
        self._finalizer()

    def __repr__(self) -> str:
        return f"RemoteObject({self.type_name}, handle={self.handle})"


class Route:
    """A Session's current executor connection, shared by all its handles.

    Each connection has an epoch and accepts the handles of the epochs it inherited: after an
    idle reclaim the new executor restores the spilled device data under the same handle ids,
    so old handles keep working; after an executor is lost its handles are refused.
    """

    def __init__(self, connect: Callable[[], ExecutorConnection] | None = None) -> None:
        self.conn: ExecutorConnection | None = None
        self.connect = connect  # the Session's: re-acquires after an idle reclaim

    def current(self) -> ExecutorConnection:
        if self.connect is not None:
            return self.connect()
        if self.conn is None:
            raise ExecutorLost("this session has no executor connection any more")
        return self.conn

    def release(self, handle: int, epoch: int) -> None:
        """A handle was collected: it is freed with the next request (no round trip)."""
        conn = self.conn
        if conn is not None and epoch in conn.epochs and not conn.closed:
            conn.to_free.append(handle)


_EPOCHS = itertools.count(1)
_FUNCTIONS = payload.FunctionPickles()  # functions called again are not pickled again


class Invocation:
    """The future of one call on the slice (``Session.submit``)."""

    def __init__(
        self,
        conn: ExecutorConnection,
        call_id: str,
        to_host: bool,
        outgoing: Outgoing,
        timeout: float | None,
    ) -> None:
        self._conn = conn
        self.call_id = call_id
        self.to_host = to_host
        self.outgoing = outgoing  # arena regions of the arguments, freed when the call ends
        self.timeout = timeout
        self._finished = False  # only a flag: whoever waits receives for everyone (no Event)
        self.timings: dict[str, float] = {}  # executor-side: stage_in_ms, compute_ms
        self._value: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._finished

    def _resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        self._conn.data.discard(self.outgoing)
        self._finished = True

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the call; raises its exception (with the remote traceback attached)."""
        limit = (
            timeout
            if timeout is not None
            else (self.timeout + 30.0 if self.timeout is not None else None)
        )
        self._conn.wait_for(self, limit)
        if self._error is not None:
            raise self._error
        if self.to_host:
            return self._conn.to_host(self._value)
        return self._value


class ExecutorConnection:
    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        key: bytes,
        lease_id: str,
        pid: int | None,
        generation: int,
        arena: Arena,
        executor_gone: Callable[[], str | None],
        route: Route | None = None,
        inherits: frozenset[int] = frozenset(),
    ) -> None:
        self.endpoint = endpoint
        self.key = key
        self.lease_id = lease_id
        self.pid = pid
        self.generation = generation
        self.epoch = next(_EPOCHS)
        self.epochs = frozenset({self.epoch}) | inherits  # whose handles this executor holds
        self.route = route if route is not None else Route()
        self.route.conn = self
        self.transport = transport_of(endpoint)
        self.data: DataPath = SocketPath() if self.transport == TCP else ArenaPath(arena)
        self.executor_gone = executor_gone  # why the executor is gone per the broker, or None
        self.lock = threading.RLock()
        self.socket = context.socket(zmq.DEALER)
        self.socket.linger = 0
        connect(self.socket, endpoint)
        self.poller = zmq.Poller()  # kept: Socket.poll builds a Poller on every call
        self.poller.register(self.socket, zmq.POLLIN)
        self.pending: dict[str, Invocation] = {}
        self.replies: dict[str, tuple[str, dict[str, Any], list[Any]]] = {}
        self.to_free: list[int] = []
        self.abandoned: set[str] = set()  # interrupted calls whose late results are dropped
        self.lost: str | None = None
        self.closed = False

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.socket.close(linger=0)

    # ---------------------------------------------------------------- sending
    def _send(self, msg_type: str, body: dict[str, Any], *frames_out: Any) -> None:
        if self.lost:
            raise ExecutorLost(self.lost)
        frames = encode(msg_type, body, self.key, sender=self.lease_id, payload=frames_out)
        send_frames(self.socket, frames)  # copies: the caller may change its arrays now

    def _pickle_hook(self, out: Outgoing) -> Callable[[Any], tuple[Any, ...] | None]:
        written: dict[int, tuple[Any, ...]] = {}  # id -> pid: a fallback re-pickle reuses it

        def hook(obj: Any) -> tuple[Any, ...] | None:
            if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
                pid = written.get(id(obj))
                if pid is None:
                    pid = self.data.put(obj, out)
                    written[id(obj)] = pid
                return pid
            if isinstance(obj, (RemoteArray, RemoteObject)):
                if obj._route is not self.route or obj.epoch not in self.epochs:
                    raise ExecutorLost(
                        f"{obj!r} belongs to an executor that is gone (or another lease): its "
                        "data was lost"
                    )
                return ("h", obj.handle)
            return None

        return hook

    def submit(
        self,
        msg_type: str,
        fn: Any,
        args: Any,
        body: dict[str, Any],
        to_host: bool,
        timeout: float | None,
    ) -> Invocation:
        """Send ``fn`` (None for call-level operations) and its arguments as one request."""
        out = Outgoing()
        call_id = os.urandom(8).hex()
        try:
            fn_data = _FUNCTIONS.dumps(fn) if fn is not None else b""
            if msg_type == "invoke" and not args[0] and not args[1]:  # (args, kwargs)
                data = payload.EMPTY_ARGS
            else:
                data = payload.dumps(args, self._pickle_hook(out))
        except BaseException:
            self.data.discard(out)
            raise
        invocation = Invocation(self, call_id, to_host, out, timeout)
        with self.lock:
            self.pending[call_id] = invocation
            try:
                body = {"call_id": call_id, "timeout": timeout, **body}
                if self.to_free:  # collected handles ride along: no message of their own
                    body["free"], self.to_free = self.to_free, []
                if len(fn_data) + len(data) <= INLINE_BYTES:  # in the header: two frames fewer
                    body["fn"], body["args"] = fn_data, data
                    self._send(msg_type, body, *out.buffers)
                else:
                    self._send(msg_type, body, fn_data, data, *out.buffers)
                out.buffers = []  # copied into the message
            except BaseException:
                self.pending.pop(call_id, None)
                invocation._resolve(error=ExecutorLost(self.lost or "send failed"))
                raise
        return invocation

    # ---------------------------------------------------------------- receiving
    def wait_for(self, invocation: Invocation, timeout: float | None) -> None:
        """Receive until ``invocation`` is done. An interrupt (Ctrl-C, a kernel interrupt)
        cancels the call on the executor before it propagates."""
        deadline = time.monotonic() + timeout if timeout is not None else None
        try:
            while not invocation.done():
                with self.lock:
                    if invocation.done():
                        return
                    self._receive_some(POLL_SLICE)
                if deadline is not None and time.monotonic() > deadline and not invocation.done():
                    raise TimeoutError(f"no result from the slice within {timeout:g} s")
        except KeyboardInterrupt:
            self.cancel(invocation)
            raise

    def cancel(self, invocation: Invocation, grace: float = CANCEL_GRACE) -> bool:
        """Ask the executor to drop ``invocation`` (queued) or interrupt it (running) and wait
        up to ``grace`` seconds for it to end; a second interrupt stops the wait. True if it
        ended; otherwise its late result is discarded when it comes."""
        if invocation.done() or self.lost or self.closed:
            return invocation.done()
        with contextlib.suppress(ExecutorUnavailable, zmq.ZMQError):
            with self.lock:
                self._send(
                    "cancel",
                    {"call_id": f"cancel-{os.urandom(4).hex()}", "target": invocation.call_id},
                )
            deadline = time.monotonic() + grace
            try:
                while not invocation.done() and time.monotonic() < deadline:
                    with self.lock:
                        self._receive_some(0.05)
            except KeyboardInterrupt:
                pass
        if invocation.done():
            return True
        with self.lock:
            if self.pending.pop(invocation.call_id, None) is not None:
                self.abandoned.add(invocation.call_id)
        invocation._resolve(error=KeyboardInterrupt("cancelled; the call was still running"))
        return False

    def _call(self, msg_type: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """A plain request/reply on this connection (fetch, free)."""
        return self._call_frames(msg_type, body, timeout)[0]

    def _call_frames(
        self, msg_type: str, body: dict[str, Any], timeout: float = 60.0
    ) -> tuple[dict[str, Any], list[Any]]:
        """``_call``, also returning the reply's payload frames."""
        call_id = os.urandom(8).hex()
        deadline = time.monotonic() + timeout
        with self.lock:
            self._send(msg_type, {"call_id": call_id, **body})
            while call_id not in self.replies:
                self._receive_some(POLL_SLICE)
                if time.monotonic() > deadline:
                    raise ExecutorUnavailable(f"no answer to {msg_type} within {timeout:g} s")
            kind, reply, frames = self.replies.pop(call_id)
        if kind == "error":
            raise self._exception(reply, b"")
        return reply, frames

    def _receive_some(self, wait: float) -> None:
        """One message (callers loop until what they wait for is done: a poll that finds the
        next message at once costs less than asking the socket whether there is one)."""
        if not self.poller.poll(int(wait * 1000)):
            self._check_alive()
            return
        try:
            if self.transport == TCP:  # fetched arrays stay in their messages (no copy)
                frames = received(self.socket.recv_multipart(zmq.NOBLOCK, copy=False), 2)
            else:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        self._dispatch(frames)

    def _check_alive(self) -> None:
        why = None
        if self.pid is not None and not pid_alive(self.pid):
            why = f"the executor (pid {self.pid}) died"
        else:
            why = self.executor_gone()
        if why:
            self._lose(f"{why}; this lease's device arrays are lost")

    def _lose(self, why: str) -> None:
        self.lost = why
        for call_id, invocation in list(self.pending.items()):
            invocation._resolve(error=ExecutorLost(why))
            del self.pending[call_id]
        raise ExecutorLost(why)

    def _dispatch(self, frames: list[bytes]) -> None:
        reason = refusal_reason(frames)
        if reason is not None:
            raise AuthenticationError(f"the executor refused the request: {reason}")
        msg = decode(frames, lambda _h: self.key, None)
        body = msg.body
        call_id = body.get("call_id", "")
        if msg.type == "stream":
            target = sys.stderr if body.get("name") == "stderr" else sys.stdout
            target.write(body.get("text", ""))
            target.flush()
            return
        invocation = self.pending.pop(call_id, None)
        if invocation is None and call_id in self.abandoned:
            self.abandoned.discard(call_id)
            if msg.type == "result":  # its handles are freed as soon as they are collected
                with contextlib.suppress(Exception):
                    payload.loads(_result_data(msg), lambda pid: self._handle_for(pid, {}))
            return
        if invocation is None:
            if call_id:  # a reply to fetch, reset...: kept for its caller (``_call``)
                self.replies[call_id] = (msg.type, body, msg.payload)
            return
        if msg.type == "result":
            invocation.timings = body.get("timings") or {}
            try:
                made: dict[int, Any] = {}
                value = payload.loads(_result_data(msg), lambda pid: self._handle_for(pid, made))
            except BaseException as exc:
                invocation._resolve(error=exc)
                return
            invocation._resolve(value)
        elif msg.type == "error":
            exc = self._exception(body, msg.payload[0] if msg.payload else b"")
            if body.get("type") == "TimeoutError" and "replaced" in body.get("message", ""):
                self.lost = body["message"]
            invocation._resolve(error=exc)

    def _handle_for(self, pid: tuple[Any, ...], made: dict[int, Any]) -> Any:
        """The handle object of a result's persistent id: one per handle id, so a handle that
        appears twice is freed once."""
        handle = pid[1]
        if handle not in made:
            if pid[0] == "h":
                made[handle] = RemoteArray(self, handle, pid[2], pid[3], pid[4])
            elif pid[0] == "obj":
                made[handle] = RemoteObject(self, handle, pid[2])
            else:
                raise ValueError(f"unknown persistent id {pid[0]!r}")
        return made[handle]

    @staticmethod
    def _exception(body: dict[str, Any], pickled: bytes) -> BaseException:
        if "code" in body:  # a protocol error (bad request...)
            return error_from_code(body["code"], body.get("message", ""), body.get("details"))
        remote_tb = body.get("traceback", "")
        exc: BaseException | None = None
        if pickled:
            try:
                import cloudpickle

                exc = cloudpickle.loads(pickled)
            except Exception:
                exc = None
        if exc is None:
            cls = getattr(builtins, body.get("type", ""), None)
            if (
                isinstance(cls, type)
                and issubclass(cls, BaseException)
                and body.get("module") == "builtins"
            ):
                try:
                    exc = cls(body.get("message", ""))
                except Exception:
                    exc = None
        if exc is None:
            exc = RemoteError(body.get("type", "Exception"), body.get("message", ""), remote_tb)
        if remote_tb and hasattr(exc, "add_note"):
            exc.add_note("Remote traceback (on the slice):\n" + remote_tb.rstrip())
        exc.remote_traceback = remote_tb  # type: ignore[attr-defined]
        return exc

    # ---------------------------------------------------------------- host copies
    def fetch(self, arrays: list[RemoteArray]) -> list[np.ndarray]:
        for array in arrays:
            if array._route is not self.route or array.epoch not in self.epochs:
                raise ExecutorLost(f"{array!r} belongs to an executor that is gone")
        out = Outgoing()
        try:
            items = self.data.fetch_items([(a.handle, a.nbytes) for a in arrays], out)
            _, frames = self._call_frames("fetch", {"items": items})
            return self.data.fetched(out, [(a.dtype, a.shape) for a in arrays], frames)
        finally:
            self.data.discard(out)  # regions not handed over to result views

    def to_host(self, value: Any) -> Any:
        """Replace every RemoteArray in a result by a host copy (one fetch for all)."""
        found: list[RemoteArray] = []
        _walk(value, found)
        if not found:
            return value
        copies = dict(zip((id(a) for a in found), self.fetch(found), strict=True))
        return _replace(value, copies)


def _result_data(msg: Message) -> Any:
    """A result's pickle: in the body when small, else the first payload frame."""
    data = msg.body.get("data")
    if isinstance(data, bytes):
        return data
    if not msg.payload:
        raise ValueError("a result without data")
    return msg.payload[0]


def _walk(value: Any, found: list[RemoteArray]) -> None:
    if isinstance(value, RemoteArray):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _walk(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _walk(item, found)


def _replace(value: Any, copies: dict[int, np.ndarray]) -> Any:
    if isinstance(value, RemoteArray):
        return copies[id(value)]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_replace(v, copies) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(v, copies) for v in value)
    if isinstance(value, dict):
        return {k: _replace(v, copies) for k, v in value.items()}
    return value


__all__ = [
    "ExecutorConnection",
    "ExecutorLost",
    "Invocation",
    "RemoteArray",
    "RemoteError",
    "RemoteObject",
    "Route",
]
