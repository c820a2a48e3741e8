"""The client side of the data plane: invocations, their futures, and handles to data that
stays on the slice.

One ``ExecutorConnection`` per Session: a DEALER to the lease's executor, and the way array
data travels to it (datapath.py: the lease's arena for an ipc executor, the messages themselves
for a tcp one; the endpoint's scheme says which).
There is no background thread: whoever waits for a result receives for everyone (under the
connection's lock), resolving other calls' futures and printing streamed output as it arrives.
While waiting it checks every quarter second that the executor process still exists, so a
dead executor is reported within a second instead of after the call's timeout, and pings an
executor that stays silent (liveness.py), so a stopped or hung one is reported too.

Rich output of a call (``display()``, figures, ``clear_output()`` on the slice, see
executor/display.py) arrives as ``display`` messages and is replayed through this process's
IPython display publisher when it has a shell (in a kernel: real display_data,
update_display_data and clear_output messages), else printed as text.

Which argument arrays go to the device: NumPy arrays that are arguments, or items of
argument lists, tuples and dicts (at any depth), are staged to the device, as the data of a
call; a NumPy array inside any other object (a pandas frame's columns, a dataclass field, a
``%%gpufunc`` cell's ``CellInputs``) arrives as a host array, since that object's code expects
NumPy. Both travel through the arena (or frames) the same way.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import logging
import os
import socket as _socket
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq
from numpy.lib.mixins import NDArrayOperatorsMixin

from . import arrayops
from .datapath import ArenaPath, DataPath, Outgoing, SocketPath
from .liveness import SilenceWatch
from .procs import pid_alive, usable_cpus
from .wire import lane as lane_wire
from .wire import payload
from .wire.arena import Arena
from .wire.errors import (
    AuthenticationError,
    ExecutorUnavailable,
    error_from_code,
)
from .wire.limits import EXECUTOR_FRAME_MAX, MiB
from .wire.messages import INLINE_BYTES, Message, decode, encode, refusal_reason
from .wire.transport import TCP, connect, received, send_frames, transport_of

POLL_SLICE = 0.25  # seconds between executor liveness checks while waiting
LANE_OPEN_TIMEOUT = 1.0  # seconds a lane request may take before the call goes by ZeroMQ
# How long a wait for a result polls its lane without sleeping before it blocks: a thread (or
# a VM's vCPU) that sleeps costs tens of microseconds to wake, which is the whole budget of a
# short call. In-process CUDA does the same while it synchronizes (it spins unless there are
# more CUDA contexts than CPUs). With 8 CPUs or more it covers calls of up to 25 ms; with
# fewer, 100 us: short calls come back within it, and a longer one is not kept from a core
# for long (on the 2-core CPU machine an empty call took 32 us with it, 65 us without; see
# docs/performance.md). One CPU: never (the executor needs it). The CPUs counted are those
# this process may run on (procs.usable_cpus). MIG_KERNEL_SPIN_US overrides.
_CPUS = usable_cpus()
SPIN = (
    float(
        os.environ.get(
            "MIG_KERNEL_SPIN_US", "25000" if _CPUS >= 8 else ("100" if _CPUS >= 2 else "0")
        )
    )
    / 1e6
)

# While it spins, a waiting client rehearses what follows the wait every this many seconds
# (``ExecutorConnection._rehearse``): after a long call every step runs from cold caches, at
# several times its warm cost, unless it ran shortly before (docs/performance.md, "GPU machine:
# the third pass"). MIG_KERNEL_REHEARSE_US overrides it (0: never).
REHEARSE = float(os.environ.get("MIG_KERNEL_REHEARSE_US", "200")) / 1e6

log = logging.getLogger("mig_kernel.client")
# Plain ints: pyzmq's enum members cost an enum operation per test on the hot path.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_DONTWAIT = int(_socket.MSG_DONTWAIT)
_LANE_CHUNK = lane_wire.LaneReader.CHUNK
CANCEL_GRACE = 3.0  # seconds an interrupted wait gives the executor to stop the call


def _check_frame_sizes(fn_data: bytes, data: bytes) -> None:
    """An executor drops the connection of a peer that sends a frame over EXECUTOR_FRAME_MAX
    (before it can check a signature); say so here instead, with what to do."""
    for what, frame in (("function", fn_data), ("arguments", data)):
        if len(frame) > EXECUTOR_FRAME_MAX:
            raise ValueError(
                f"the call's {what} pickle to {len(frame) / MiB:.0f} MiB; an executor accepts "
                f"at most {EXECUTOR_FRAME_MAX // MiB} MiB per message frame. Pass large data "
                "as NumPy arrays (they travel apart from the pickle) or put() it first."
            )


class ExecutorLost(ExecutorUnavailable):
    """The executor died (killed, crashed, timed out): this lease's device data is gone."""

    code = "executor_lost"


class RemoteError(Exception):
    """An exception raised by the function on the slice whose type could not be rebuilt here."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class RemoteArray(NDArrayOperatorsMixin):
    """A device array that stays on the slice. Shape, dtype and size are known here; ``get()``
    copies it to the host; passing it to a later call moves no data.

    It follows CuPy's conventions for a device array seen from the host: no implicit
    conversion (``np.asarray(h)`` raises TypeError, pointing at ``.get()``); arithmetic,
    comparisons, indexing, reductions, methods, NumPy ufuncs and NumPy functions run on the
    slice, one invocation each, and return RemoteArrays (``h + 1``, ``h[:5]``, ``h.max()``,
    ``np.sqrt(h)``, ``np.mean(h)``), so they chain without moving data; ``float()``,
    ``int()``, ``bool()`` of a one-element array fetch it. ``repr`` shows shape, dtype, the
    slice and a few values (one small fetch)."""

    __array_priority__ = 100  # its operators win over a NumPy array's

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

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def get(self) -> np.ndarray:
        """A host (numpy) copy of the array."""
        return self._route.current().fetch([self])[0]

    def free(self) -> None:
        """Free the device memory now (otherwise it is freed when this handle is collected)."""
        self._finalizer()

    # -- on the slice ------------------------------------------------------------------------
    def _on_slice(self, fn: Callable[..., Any], *args: Any) -> Any:
        conn = self._route.current()
        return conn.submit("invoke", fn, (args, {}), {}, False, None).result()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(
            "Implicit conversion of a RemoteArray to a NumPy array is not allowed: its data is "
            "on the GPU slice. Call .get() for a NumPy copy (as with CuPy)."
        )

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return self._on_slice(arrayops.ufunc, ufunc, method, inputs, kwargs)

    def __array_function__(
        self, func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return self._on_slice(arrayops.function, func, args, kwargs)

    def __getitem__(self, key: Any) -> Any:
        return self._on_slice(arrayops.getitem, self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._on_slice(arrayops.setitem, self, key, value)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self) -> Any:
        if not self.shape:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def _scalar(self, kind: str) -> Any:
        if self.size != 1:
            raise TypeError(f"only one-element arrays can be converted to Python {kind}s")
        return self.get().reshape(()).item()

    def __float__(self) -> float:
        return float(self._scalar("scalar"))

    def __int__(self) -> int:
        return int(self._scalar("scalar"))

    def __complex__(self) -> complex:
        return complex(self._scalar("scalar"))

    def __index__(self) -> int:
        if self.ndim or self.dtype.kind not in "iub":
            raise TypeError("only integer scalar arrays can be converted to a scalar index")
        return int(self._scalar("int"))

    def __bool__(self) -> bool:
        if self.size != 1:
            raise ValueError(
                "The truth value of an array with more than one element is ambiguous. "
                "Use a.any() or a.all()"
            )
        return bool(self._scalar("bool"))

    def item(self) -> Any:
        return self._scalar("scalar")

    def tolist(self) -> Any:
        return self.get().tolist()

    @property
    def T(self) -> Any:
        return self._on_slice(arrayops.attribute, self, "T")

    @property
    def real(self) -> Any:
        return self._on_slice(arrayops.attribute, self, "real")

    @property
    def imag(self) -> Any:
        return self._on_slice(arrayops.attribute, self, "imag")

    def __getattr__(self, name: str) -> Any:
        if name in _ARRAY_METHODS:

            def call(*args: Any, **kwargs: Any) -> Any:
                return self._on_slice(arrayops.method, self, name, args, kwargs)

            call.__name__ = name
            return call
        raise AttributeError(
            f"RemoteArray has no attribute {name!r}: its data is on the GPU slice; run the "
            "code there (%%gpufunc, Session.run) or call .get() for a NumPy copy"
        )

    def __repr__(self) -> str:
        where = self._route.describe()
        head = f"RemoteArray(shape={self.shape}, dtype={self.dtype}" + (
            f", slice={where}" if where else ""
        )
        try:
            first, last = self._on_slice(arrayops.preview, self, _PREVIEW)
        except Exception as exc:  # a repr must not raise (tracebacks, debuggers)
            return f"{head}, handle={self.handle}: no preview, {type(exc).__name__})"
        return f"{head}: {_preview_text(first, last, self.ndim)})"


_PREVIEW = 3  # values shown from each end


def _preview_text(first: np.ndarray, last: np.ndarray | None, ndim: int) -> str:
    """``[0., 1., 2., ..., 7., 8., 9.]`` as NumPy summarizes (the flattened values, one
    format for all of them); a 0-d array's value alone."""
    values = first if last is None else np.concatenate([first, last])
    if ndim == 0:
        return np.array2string(values.reshape(()), separator=", ")
    text = np.array2string(values, separator=", ", threshold=values.size + 1)[1:-1]
    if last is None:
        return f"[{text}]"
    items = " ".join(text.split()).split(", ")
    if first.dtype.names or len(items) != values.size:  # structured values: the first ones
        return "[" + np.array2string(first, separator=", ")[1:-1] + ", ...]"
    return "[" + ", ".join([*items[: first.size], "...", *items[first.size :]]) + "]"


# Methods of cupy.ndarray (and numpy.ndarray) that run on the slice through ``__getattr__``.
_ARRAY_METHODS = frozenset(
    """all any argmax argmin argpartition argsort astype choose clip compress conj conjugate copy
    cumprod cumsum diagonal dot fill flatten max mean min nonzero partition prod ptp put ravel
    repeat reshape round searchsorted sort squeeze std sum swapaxes take trace transpose var
    view""".split()  # noqa: SIM905
)


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

    def __init__(
        self,
        connect: Callable[[], ExecutorConnection] | None = None,
        where: Callable[[], str] | None = None,
    ) -> None:
        self.conn: ExecutorConnection | None = None
        self.connect = connect  # the Session's: re-acquires after an idle reclaim
        self.where = where  # the Session's: its slice, for reprs

    def describe(self) -> str:
        """The slice the data is on (``gpu0-s3 (1g.10gb)``), or "" if unknown."""
        try:
            return self.where() if self.where is not None else ""
        except Exception:
            return ""

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
_CALLS = itertools.count(1)
_CALL_PREFIX = os.urandom(4).hex()  # this process's; a counter after it (no syscall per call)


def _call_id() -> str:
    """A call id unique in this process (the executor keys its jobs and cancels by it)."""
    return f"{_CALL_PREFIX}{next(_CALLS):x}"


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
        self.sent_at = time.monotonic()  # silence of the executor counts from here (liveness)
        self._finished = False  # only a flag: whoever waits receives for everyone (no Event)
        self.timings: dict[str, float] = {}  # executor-side: stage_in_ms, compute_ms
        self._value: Any = None
        self._error: BaseException | None = None
        self._data: bytes = b""  # the result's pickle, kept when ``to_host`` (see result())
        self._made: dict[int, Any] = {}  # its handle objects by handle id

    def done(self) -> bool:
        return self._finished

    def _resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        out = self.outgoing
        if out.regions or out.buffers:
            self._conn.data.discard(out)
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
        if self.to_host and any(isinstance(h, RemoteArray) for h in self._made.values()):
            self._value = self._conn.to_host(self._data, self._made)
            self._made, self._data = {}, b""
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
        self.silence = SilenceWatch()
        # The lane (wire/lane.py) opens with the first request; off on tcp and when
        # MIG_KERNEL_LANE=0 (the benchmarks' signed-ZeroMQ baseline).
        self.lane: _socket.socket | None = None
        self.lane_reader: lane_wire.LaneReader | None = None
        self.lane_tried = self.transport == TCP or os.environ.get("MIG_KERNEL_LANE") == "0"
        self.spin_until = 0.0
        # What ``_rehearse`` runs again: the latest plain result read whole, the latest request
        # sent by the lane (type, body) and its function (a weak reference).
        self.last_reply: bytes = b""
        self.last_request: tuple[str, dict[str, Any]] | None = None
        self.last_function: weakref.ref[Any] | None = None
        self.rehearsals = 0  # how often it did (for tests and benchmarks)
        self.echo_out = False  # a rehearsed round trip (lane_wire.ECHO) awaits its answer
        self.echoes = 0  # answers to those that came (for tests and benchmarks)

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self._close_lane()
                self.socket.close(linger=0)

    def lane_active(self) -> bool:
        """Whether requests go by the lane (for benchmarks and tests)."""
        return self.lane is not None

    # ---------------------------------------------------------------- the lane
    def _open_lane(self) -> None:
        """Ask the executor for a lane and connect it; on any failure (an executor without
        lanes, another network namespace, a uid it refuses) requests keep going by ZeroMQ."""
        self.lane_tried = True
        try:
            # A live executor answers at once (its watcher thread does during a long call): a
            # stopped one must not hold the request up; its turn comes again later.
            reply = self._call("lane", {}, timeout=LANE_OPEN_TIMEOUT)
            sock = lane_wire.connect(reply["address"], reply["token"])
        except ExecutorLost:
            raise
        except ExecutorUnavailable as exc:
            log.debug(
                "no answer to the lane request of %s (%s); ZeroMQ for now", self.endpoint, exc
            )
            self.lane_tried = False  # asked again with a later request
            return
        except Exception as exc:
            log.debug("no lane to %s (%s); requests go by ZeroMQ", self.endpoint, exc)
            return
        lane_wire.receive_timeout(sock, POLL_SLICE)  # a wait on it looks up this often
        self.lane, self.lane_reader = sock, lane_wire.LaneReader(sock)
        self.poller.register(sock, zmq.POLLIN)

    def _close_lane(self) -> None:
        sock, self.lane, self.lane_reader = self.lane, None, None
        if sock is not None:
            with contextlib.suppress(KeyError):
                self.poller.unregister(sock)
            sock.close()

    def _receive_lane(self, wait: bool = True) -> bool:
        """One message from the lane (False: none had come, without ``wait``); a lane that
        broke is closed (what follows comes by ZeroMQ: the executor sends there what its lane
        could not carry)."""
        assert self.lane_reader is not None
        try:
            message = self.lane_reader.next(wait)
        except lane_wire.LaneBroken as exc:
            log.debug("the lane to %s broke (%s)", self.endpoint, exc)
            self._close_lane()
            return True
        if message is None:
            return False
        self._handle_lane(message)
        return True

    def _handle_lane(self, message: tuple[str, dict[str, Any], tuple[Any, ...]]) -> None:
        """A message the lane brought: unsigned (the kernel vouches for its sender)."""
        kind, body, frames = message
        self._handle_message(Message(kind, body, b"", 0.0, payload=list(frames)))

    def _spin(self) -> bool:
        """Poll the lane without sleeping until something comes (True) or the spin window
        ends (False). The ZeroMQ socket is looked at too, now and then."""
        clock, until = time.monotonic, self.spin_until
        receive = self._receive_lane
        events = self.socket.getsockopt
        i = 0
        while True:
            if receive(False):
                return True
            i += 1
            if i % 32 == 0:
                if events(_EVENTS) & _POLLIN:
                    return False
                if clock() >= until:
                    return False
                os.sched_yield()

    def _rehearse(self) -> None:
        """Run again, to no effect, the steps that follow a wait: reading a plain result (the
        latest one), the next request of the same function (its pickle cache's check, the
        request's pickle), and a round trip by the lane (an echo, unless one is on its way,
        which the executor answers while it waits for the call's GPU work: the system
        calls' path goes cold too). A step that ran shortly before runs at its warm cost;
        after 20 ms of waiting, at several times that (docs/performance.md). Nothing is
        stored or changed; the echo's answer is dropped as a late liveness probe's is."""
        if not self.echo_out and self.lane is not None:
            try:
                lane_wire.send_packed(self.lane, lane_wire.ECHO)
                self.echo_out = True
            except lane_wire.LaneBroken:
                pass  # the wait's next receive finds out
        if self.last_reply:
            lane_wire.whole_message(self.last_reply)
        function = self.last_function() if self.last_function is not None else None
        if function is not None:
            _FUNCTIONS.rehearse(function)
        if self.last_request is not None:
            lane_wire.pack(*self.last_request)
        self.rehearsals += 1

    # ---------------------------------------------------------------- sending
    def _send(self, msg_type: str, body: dict[str, Any], *frames_out: Any) -> None:
        if self.lost:
            raise ExecutorLost(self.lost)
        if not self.lane_tried:
            self._open_lane()
        if self.lane is not None:
            try:
                lane_wire.send_packed(self.lane, lane_wire.pack(msg_type, body, frames_out))
                self.last_request = (msg_type, body)
                return
            except lane_wire.LaneBroken as exc:
                log.debug("the lane to %s broke (%s)", self.endpoint, exc)
                self._close_lane()
        if "argv" in body:  # plain arguments for the lane: ZeroMQ carries their pickle
            body["args"] = _pickle_argv(body.pop("argv"), body.pop("handles", None))
        frames = encode(msg_type, body, self.key, sender=self.lease_id, payload=frames_out)
        send_frames(self.socket, frames)  # copies: the caller may change its arrays now

    def _pickle_hook(
        self, out: Outgoing, device: set[int] | None = None
    ) -> Callable[[Any], tuple[Any, ...] | None]:
        """Arrays into the arena (or frames), handles by id. ``device``: ids of the arrays to
        stage to the device (``_device_arrays``); the others arrive as host arrays."""
        written: dict[int, tuple[Any, ...]] = {}  # id -> pid: a fallback re-pickle reuses it

        def hook(obj: Any) -> tuple[Any, ...] | None:
            if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
                pid = written.get(id(obj))
                if pid is None:
                    pid = self.data.put(obj, out)
                    if device is not None and id(obj) not in device:
                        pid = ("host", pid)
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

    def _handle_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[tuple[Any, ...], dict[str, Any]], list[int | str]] | None:
        """A call on data already on the slice (``run(f, a, b)`` with handles of this
        executor, besides plain values): its (args, kwargs) with each handle replaced by its
        number, for the lane's own pickle, and the positions that hold one (an index into
        args, a keyword). None when any argument is something else (a NumPy array, a
        container, a handle of another executor): the pickler with its hook handles those,
        and refuses a lost handle."""
        # One pass that also makes the numbered copy (a short call's every step counts).
        route, epochs = self.route, self.epochs
        positions: list[int | str] = []
        numbered_args, numbered_kwargs = list(args), dict(kwargs)
        for at, value in itertools.chain(enumerate(args), kwargs.items()):
            kind = type(value)
            if kind is RemoteArray or kind is RemoteObject:
                if value._route is not route or value.epoch not in epochs:
                    return None  # another executor's, or lost: the pickler's hook says which
                positions.append(at)
                if type(at) is int:
                    numbered_args[at] = value.handle
                else:
                    numbered_kwargs[at] = value.handle
            elif not _plain_value(value):
                return None
        if not positions:
            return None
        return (tuple(numbered_args), numbered_kwargs), positions

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
        call_id = _call_id()
        try:
            fn_data = _FUNCTIONS.dumps(fn) if fn is not None else b""
            if type(fn) is types.FunctionType:
                self.last_function = weakref.ref(fn)
            argv = None
            if msg_type == "invoke" and not args[0] and not args[1]:  # (args, kwargs)
                data = payload.EMPTY_ARGS
            elif (
                msg_type == "invoke"
                and self.lane is not None
                and len(fn_data) <= INLINE_BYTES  # (so a fallback's header stays small)
                and _plain_arguments(*args)
            ):
                argv, data = args, b""  # in the lane's own pickle (no pickler of our own)
            elif (
                msg_type == "invoke"
                and self.lane is not None
                and len(fn_data) <= INLINE_BYTES
                and (by_number := self._handle_arguments(*args)) is not None
            ):
                (argv, body["handles"]), data = by_number, b""
            else:
                device = _device_arrays(args) if msg_type == "invoke" else None
                data = payload.dumps(args, self._pickle_hook(out, device))
            if argv is None:  # (else the function is small, and no arguments are pickled)
                _check_frame_sizes(fn_data, data)
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
                if argv is not None:
                    body["fn"], body["argv"] = fn_data, argv
                    self._send(msg_type, body)
                elif len(fn_data) + len(data) <= INLINE_BYTES:  # in the header: 2 frames fewer
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
        now = time.monotonic()
        deadline = now + timeout if timeout is not None else None
        self.spin_until = now + SPIN if SPIN > 0 else 0.0
        try:
            if self._quick_wait(invocation):
                return
            while not invocation._finished:
                with self.lock:
                    if invocation._finished:
                        return
                    self._receive_some(POLL_SLICE)
                    if not invocation._finished:
                        self._probe(invocation)
                if deadline is not None and time.monotonic() > deadline and not invocation.done():
                    raise TimeoutError(f"no result from the slice within {timeout:g} s")
        except KeyboardInterrupt:
            self.cancel(invocation)
            raise

    def _quick_wait(self, invocation: Invocation) -> bool:
        """The usual wait in fewer steps (after a long call every step runs from cold caches,
        so each one counts: docs/performance.md): the lane alone, spun on until something
        comes or the spin window ends, nothing read ahead. A plain result of this call
        resolves it here; any other whole message is handled as ``_receive_some`` would; a
        part of one, or more than one, is left to the lane's reader, and anything unusual
        (end of stream, an error) to the full wait, which meets it again. True when the call
        is done; ``wait_for`` goes on otherwise (not spinning again if the window ran out)."""
        sock, reader = self.lane, self.lane_reader
        if sock is None or reader is None or reader.rest or not self.spin_until:
            return invocation._finished
        recv, clock, until = sock.recv, time.monotonic, self.spin_until
        every = REHEARSE
        self.echo_out = False  # one lost (a cancel struck as it was answered) stops none
        due = clock() + every if every > 0 else until  # (0: the window ends first)
        spins = 0
        with self.lock:
            while not invocation._finished:
                try:
                    data = recv(_LANE_CHUNK, _DONTWAIT)
                except BlockingIOError:
                    spins += 1
                    if spins & 31 == 0:
                        now = clock()
                        if now >= until:
                            self.spin_until = 0.0
                            return False
                        if now >= due:
                            self._rehearse()
                            due = clock() + every
                        else:
                            os.sched_yield()
                    continue
                except OSError:
                    return False
                if not data:
                    return False
                try:
                    message = lane_wire.whole_message(data)
                except lane_wire.LaneBroken as exc:
                    log.debug("the lane to %s broke (%s)", self.endpoint, exc)
                    self._close_lane()
                    return invocation._finished
                if message is None:
                    reader.rest = data
                    return False
                kind, body, _ = message
                if (
                    kind == "result"
                    and "value" in body
                    and body.get("call_id") == invocation.call_id
                    and self.pending.pop(invocation.call_id, None) is invocation
                ):
                    self.silence.heard(None)
                    invocation.timings = body.get("timings") or {}
                    invocation._resolve(body["value"])
                    self.last_reply = data
                    return True
                self._handle_lane(message)
        return True

    def _probe(self, invocation: Invocation) -> None:
        """Ping a silent executor; end the wait if it stays silent (liveness.py)."""
        since, timeout = invocation.sent_at, invocation.timeout
        why = self.silence.verdict(since, timeout)
        if why is not None:
            if timeout is not None:
                raise TimeoutError(why)
            raise ExecutorUnavailable(why)
        probe = self.silence.probe_due(since)
        if probe is not None:
            self._send("ping", {"call_id": probe})

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
        call_id = _call_id()
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
        next message at once costs less than asking the socket whether there is one). What
        the lane holds goes first: the executor sends by ZeroMQ only what came after it."""
        reader = self.lane_reader
        if reader is not None:
            if reader.buffered():  # read with an earlier message: the socket shows nothing
                self._receive_lane(False)
                return
            if self.spin_until and self._spin():
                return
            self.spin_until = 0.0  # spun out: block from now on, until the next wait
            if not self.socket.getsockopt(_EVENTS) & _POLLIN:
                # While the lane works everything comes by it (the executor turns to ZeroMQ
                # only once it broke): wait on it alone, for up to its receive timeout.
                if not self._receive_lane(True):
                    self._check_alive()
                return
        events = self.poller.poll(int(wait * 1000))
        if not events:
            self._check_alive()
            return
        if self.lane is not None and any(fd == self.lane.fileno() for fd, _ in events):
            self._receive_lane()
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
        self._handle_message(decode(frames, lambda _h: self.key, None))

    def _handle_message(self, msg: Message) -> None:
        body = msg.body
        call_id = body.get("call_id", "")
        if self.silence.heard(call_id):  # the answer to a liveness probe (or to an echo)
            if call_id == lane_wire.ECHO_ID:
                self.echo_out = False
                self.echoes += 1
            return
        if msg.type == "stream":
            target = sys.stderr if body.get("name") == "stderr" else sys.stdout
            target.write(body.get("text", ""))
            target.flush()
            return
        if msg.type == "display":
            _show_display(body)
            return
        invocation = self.pending.pop(call_id, None)
        if invocation is None and call_id in self.abandoned:
            self.abandoned.discard(call_id)
            if msg.type == "result":  # its handles are freed as soon as they are collected
                with contextlib.suppress(Exception):
                    payload.loads(_result_data(msg), self._loader({}))
            return
        if invocation is None:
            if call_id:  # a reply to fetch, reset...: kept for its caller (``_call``)
                self.replies[call_id] = (msg.type, body, msg.payload)
            return
        if msg.type == "result":
            invocation.timings = body.get("timings") or {}
            if "value" in body:  # a plain value (None, a number, a short string) by the lane
                invocation._resolve(body["value"])
                return
            try:
                made: dict[int, Any] = {}
                data = _result_data(msg)
                value = payload.loads(data, self._loader(made), keep_classes=True)
            except BaseException as exc:
                invocation._resolve(error=exc)
                return
            if invocation.to_host and made:
                invocation._data, invocation._made = bytes(data), made
            invocation._resolve(value)
        elif msg.type == "error":
            exc = self._exception(body, msg.payload[0] if msg.payload else b"")
            if body.get("type") == "TimeoutError" and "replaced" in body.get("message", ""):
                self.lost = body["message"]
            invocation._resolve(error=exc)

    def _loader(
        self, made: dict[int, Any], host: dict[int, np.ndarray] | None = None
    ) -> _ResultLoader:
        """The persistent-id loader of a result (``_ResultLoader``)."""
        return _ResultLoader(self, made, host)

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

    def to_host(self, data: bytes, made: dict[int, Any]) -> Any:
        """A result again, with host copies where its device arrays were, wherever they are
        (lists, dicts, dataclasses, any object): one fetch for all of them, then the result's
        pickle loaded a second time with those copies in place of the handles. Opaque handles
        stay the objects already made; the RemoteArrays are dropped (and so freed)."""
        arrays = {h: a for h, a in made.items() if isinstance(a, RemoteArray)}
        copies = dict(zip(arrays, self.fetch(list(arrays.values())), strict=True))
        return payload.loads(data, self._loader(made, copies), keep_classes=True)


class _ResultLoader:
    """Turns a result's persistent ids into objects: handle objects, one per handle id (so a
    handle that appears twice is one object, freed once), collected in ``made``; ``host``:
    host copies to put where device arrays were (``to_host``); ``parts`` and ``pickle`` ids
    are loaded with this same loader. An object, not a closure: a closure that passes itself
    on would be a reference cycle, and the handles in ``made`` would wait for the garbage
    collector instead of being freed with the next request."""

    def __init__(
        self, conn: ExecutorConnection, made: dict[int, Any], host: dict[int, Any] | None
    ) -> None:
        self.conn = conn
        self.made = made
        self.host = host

    def __call__(self, pid: tuple[Any, ...]) -> Any:
        kind = pid[0]
        if kind == "parts":
            return payload.load_parts(pid[1], self, keep_classes=True)
        if kind == "pickle":
            return payload.loads(pid[1], self, keep_classes=True)
        handle = pid[1]
        if self.host is not None and kind == "h":
            return self.host[handle]
        made = self.made
        if handle not in made:
            if kind == "h":
                made[handle] = RemoteArray(self.conn, handle, pid[2], pid[3], pid[4])
            elif kind == "obj":
                made[handle] = RemoteObject(self.conn, handle, pid[2])
            else:
                raise ValueError(f"unknown persistent id {kind!r}")
        return made[handle]


def _result_data(msg: Message) -> Any:
    """A result's pickle: in the body when small, else the first payload frame."""
    data = msg.body.get("data")
    if isinstance(data, bytes):
        return data
    if not msg.payload:
        raise ValueError("a result without data")
    return msg.payload[0]


_PLAIN_SCALARS = frozenset({int, float, bool, complex, type(None)})
_PLAIN_TEXT = frozenset({str, bytes})
PLAIN_TEXT_MAX = 256  # longer strings and bytes are pickled as before (and may be frames)


def _plain_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call's arguments are only numbers, None and short strings: no array and no
    handle to stand in for, so the lane's pickle can carry them as they are."""
    return all(map(_plain_value, itertools.chain(args, kwargs.values())))


def _plain_value(value: Any) -> bool:
    kind = type(value)
    return kind in _PLAIN_SCALARS or (kind in _PLAIN_TEXT and len(value) <= PLAIN_TEXT_MAX)


class _HandleNumber(int):
    """A handle's number in arguments the lane could not take: pickled as the handle."""


def _pickle_argv(argv: Any, handles: list[int | str] | None) -> bytes:
    """The pickle ZeroMQ carries for arguments made for the lane (``_plain_arguments``,
    ``ExecutorConnection._handle_arguments``): the numbers at ``handles`` go as handle ids, as the
    pickler's hook would have written them."""
    if not handles:
        return payload.dumps(argv, lambda _obj: None)

    def hook(obj: Any) -> tuple[str, int] | None:
        return ("h", int(obj)) if type(obj) is _HandleNumber else None

    return payload.dumps(lane_wire.replace_at(argv, handles, _HandleNumber), hook)


def _device_arrays(args: Any) -> set[int]:
    """Ids of the NumPy arrays of a call's (args, kwargs) that go to the device: reachable
    through lists, tuples and dicts only (the module docstring says why)."""
    found: set[int] = set()
    stack = [args]
    while stack:
        value = stack.pop()
        if isinstance(value, np.ndarray):
            found.add(id(value))
        elif isinstance(value, (list, tuple)):
            stack.extend(v for v in value if not isinstance(v, _LEAVES))
        elif isinstance(value, dict):
            stack.extend(v for v in value.values() if not isinstance(v, _LEAVES))
    return found


_LEAVES = (str, bytes, int, float, complex, type(None))


def _show_display(body: dict[str, Any]) -> None:
    """A ``display`` message of a call (executor/display.py), shown as if published here: by
    the IPython shell's display publisher when this process has one (so in a kernel, the
    notebook gets display_data, update_display_data or clear_output), else as text."""
    module = sys.modules.get("IPython.core.interactiveshell")
    shell_class = getattr(module, "InteractiveShell", None)
    kind = body.get("kind")
    if shell_class is None or not shell_class.initialized():
        text = (body.get("data") or {}).get("text/plain")
        if kind != "clear_output" and text:
            print(text)
        return
    publisher = shell_class.instance().display_pub
    if kind == "clear_output":
        publisher.clear_output(wait=bool(body.get("wait")))
    else:
        publisher.publish(
            data=body.get("data") or {},
            metadata=body.get("metadata") or {},
            transient=body.get("transient") or {},
            update=kind == "update_display_data",
        )


__all__ = [
    "ExecutorConnection",
    "ExecutorLost",
    "Invocation",
    "RemoteArray",
    "RemoteError",
    "RemoteObject",
    "Route",
]
