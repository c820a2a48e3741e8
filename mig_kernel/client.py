"""The client side of leases: ``connect()`` returns a Session that holds a slice.

A Session keeps its lease alive with heartbeats from a background thread (its own socket) and
notices when the broker ends it (idle, holder lost, admin). The data-plane calls (``run``,
``submit``) talk to the lease's executor with the lease key.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from .channel import Channel
from .remote import ExecutorConnection, Invocation, RemoteArray, RemoteObject, Route
from .wire.arena import Arena
from .wire.connection import ConnectionInfo, read_connection_file
from .wire.errors import (
    AcquireTimeout,
    BrokerUnavailable,
    ExecutorUnavailable,
    LeaseEnded,
    MigKernelError,
)

QueuedCallback = Callable[[int, int], None]  # (position, queue length)


class BrokerClient:
    """A signed session with the node broker (one socket; see Channel for threading)."""

    def __init__(
        self,
        connection_file: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 10.0,
        credentials: tuple[str, bytes] | None = None,
        context: zmq.Context | None = None,
        claims: dict[str, Any] | None = None,
    ) -> None:
        """``claims`` go into the hello that opens the session: who the caller says it is,
        which the broker's identity provider verifies (the OS user by default)."""
        self.info: ConnectionInfo = read_connection_file(connection_file)
        self.connection_file = connection_file
        self.context = context or zmq.Context.instance()
        self.channel = Channel(
            self.context, self.info.endpoint, self.info.key_bytes, None, timeout=timeout
        )
        if credentials is None:
            try:
                hello = self.channel.call(
                    "hello", {"user": getpass.getuser(), "pid": os.getpid(), **(claims or {})}
                )
            except BaseException:
                self.channel.close()
                raise
            self.client_id: str = hello["client_id"]
            self.session: dict[str, Any] = hello
            credentials = (hello["client_id"], bytes.fromhex(hello["client_key"]))
        else:
            self.session = {}
        self.client_id, self.key = credentials
        self.channel.key, self.channel.sender = self.key, self.client_id

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fork(self) -> BrokerClient:
        """Another socket with the same client session (for another thread)."""
        return BrokerClient(
            self.connection_file, credentials=(self.client_id, self.key), context=self.context
        )

    def request(self, msg_type: str, timeout: float | None = None, **body: Any) -> dict[str, Any]:
        return self.channel.call(msg_type, body, timeout=timeout)

    # -- leases ----------------------------------------------------------------------------
    def acquire(
        self,
        profile: str | None = None,
        *,
        memory: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
        on_queued: QueuedCallback | None = None,
        restore: str | None = None,
    ) -> dict[str, Any]:
        """Lease a slice; waits in the broker's FIFO queue unless ``wait=False``. ``restore``
        names an idle-reclaimed lease whose spilled device data the new executor loads (the
        reply's ``restored`` says how it went).

        While queued the request is re-sent every ``queue_keepalive`` seconds (the broker drops
        waiters that stop doing so, and a restarted broker learns of the waiter again); each
        answer reports the position. An interrupt or the timeout cancels the request.
        """
        ticket = "T-" + os.urandom(8).hex()
        body = {
            "profile": profile,
            "memory": memory,
            "wait": wait,
            "timeout": timeout,
            "ticket": ticket,
            "restore": restore,
        }
        keepalive = float(self.session.get("queue_keepalive", 1.0))
        deadline = time.monotonic() + timeout if timeout is not None else None
        channel = self.channel
        with channel.lock:
            sent: set[bytes] = set()
            try:
                while True:
                    sent.add(channel.send("acquire", body))
                    turn_end = time.monotonic() + keepalive
                    if deadline is not None:
                        turn_end = min(turn_end, deadline)
                    while True:  # listen until the grant comes or the turn ends
                        try:
                            reply = channel.receive(lambda m: m.re in sent, turn_end).body
                        except BrokerUnavailable:
                            break  # the turn is over: send the keepalive
                        if reply.get("status") == "granted":
                            return {**reply["lease"], "restored": reply.get("restored")}
                        if on_queued is not None:
                            on_queued(int(reply["position"]), int(reply["queue_length"]))
                    if deadline is not None and time.monotonic() >= deadline:
                        raise AcquireTimeout(f"no slice granted within {timeout:g} s")
            except BaseException:
                self._cancel(ticket)
                raise

    def _cancel(self, ticket: str) -> None:
        """Withdraw a queued request (and give back a grant that crossed the cancel)."""
        # If the broker is gone, the queue entry dies with its keepalives anyway.
        with contextlib.suppress(MigKernelError):
            self.channel.call("cancel", {"ticket": ticket}, timeout=2.0)

    def release(self, lease_id: str) -> dict[str, Any]:
        return self.request("release", lease_id=lease_id)

    def heartbeat(self, lease_ids: list[str]) -> dict[str, Any]:
        return self.request("heartbeat", lease_ids=lease_ids)["leases"]

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def lease(self, lease_id: str) -> dict[str, Any]:
        return self.request("lease", lease_id=lease_id)

    def metrics(self) -> str:
        return self.request("metrics")["text"]

    def watch_info(self) -> dict[str, Any]:
        return self.request("watch")

    def drain(self, slice_id: str) -> dict[str, Any]:
        return self.request("drain", slice_id=slice_id)

    def undrain(self, slice_id: str) -> dict[str, Any]:
        return self.request("undrain", slice_id=slice_id)

    def apply_layout(self, gpu: int, layout: str) -> dict[str, Any]:
        return self.request("apply_layout", gpu=gpu, layout=layout, timeout=120.0)


_open_sessions: weakref.WeakSet[Session] = weakref.WeakSet()


def _heartbeat_loop(
    broker: BrokerClient,
    lease_id: str,
    interval: float,
    stop: threading.Event,
    state: dict[str, Any],
) -> None:
    """Runs in the Session's thread; holds no reference to the Session so it can be collected."""
    try:
        while not stop.wait(interval):
            try:
                reply = broker.heartbeat([lease_id]).get(lease_id, {})
            except MigKernelError as exc:
                state["last_error"] = str(exc)  # broker restarting: keep trying
                continue
            state["last_error"] = None
            if reply.get("state") == "active":
                state["idle_seconds"] = reply.get("idle_seconds")
                state["generation"] = reply.get("generation", 0)
            else:
                state["ended"] = reply.get("reason") or reply.get("state")
                return
    finally:
        broker.close()


class Session:
    """A held lease: the slice's description, its executor's address and key, and heartbeats."""

    def __init__(
        self,
        broker: BrokerClient,
        lease: dict[str, Any],
        *,
        owns_broker: bool = True,
        request: dict[str, Any] | None = None,
        reacquire: bool = True,
        on_reacquire: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.broker = broker
        self._owns_broker = owns_broker
        self.request = request or {"profile": lease["slice"]["profile"], "memory": None}
        self.reacquire = reacquire  # after an idle reclaim, lease again on the next call
        self.on_reacquire = on_reacquire
        self.reacquired: dict[str, Any] | None = None
        self._apply_lease(lease)
        self.released = False
        self._arena = Arena(self.id.removeprefix("L-"))
        self._route = Route(connect=self._connection)
        self._conn: ExecutorConnection | None = None
        self._inherit: frozenset[int] = frozenset()  # handle epochs the next connection keeps
        self._start_heartbeat(lease)
        _open_sessions.add(self)

    def _start_heartbeat(self, lease: dict[str, Any]) -> None:
        self._state: dict[str, Any] = {"ended": None, "generation": self.generation}
        self._stop = threading.Event()
        interval = float(lease.get("heartbeat_interval", 5.0))
        self._thread = threading.Thread(
            target=_heartbeat_loop,
            args=(self.broker.fork(), self.id, interval, self._stop, self._state),
            name=f"mig-kernel heartbeat {self.id}",
            daemon=True,
        )
        self._thread.start()

    def _reacquire(self) -> None:
        """Lease a slice again after an idle reclaim; the new executor restores the spilled
        device data, and every RemoteArray of this session keeps working."""
        started = time.perf_counter()
        old_id = self.id
        inherited = self._conn.epochs if self._conn is not None else frozenset()
        lease = self.broker.acquire(
            self.request.get("profile"), memory=self.request.get("memory"), restore=old_id
        )
        self._stop.set()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._apply_lease(lease)
        self._start_heartbeat(lease)
        restored = lease.get("restored") or {}
        self._inherit = inherited if restored.get("restored") else frozenset()
        self.reacquired = {
            "previous_lease": old_id,
            "lease": self.id,
            "seconds": time.perf_counter() - started,
            "restored": int(restored.get("restored") or 0),
            "error": restored.get("error"),
        }
        if self.on_reacquire is not None:
            self.on_reacquire(self.reacquired)

    def _apply_lease(self, lease: dict[str, Any]) -> None:
        self.lease = lease
        self.id: str = lease["id"]
        self.slice: dict[str, Any] = lease["slice"]
        self.key = bytes.fromhex(lease["key"])
        self.executor_endpoint: str | None = lease["executor"]["endpoint"]
        self.executor_pid: int | None = lease["executor"].get("pid")
        self.generation: int = lease["executor"]["generation"]

    # -- what the user sees -------------------------------------------------------------
    @property
    def profile(self) -> str:
        return self.slice["profile"]

    @property
    def isolation(self) -> str:
        return self.slice["isolation"]

    @property
    def memory_total(self) -> int:
        return int(self.slice["memory_total"])

    @property
    def ended(self) -> str | None:
        """Why the broker ended the lease (``idle``, ``holder_lost``...), None while held."""
        return self._state["ended"]

    def __repr__(self) -> str:
        state = (
            "released" if self.released else (f"ended: {self.ended}" if self.ended else "active")
        )
        return (
            f"<mig_kernel.Session {self.id} {self.profile} on {self.slice['id']} "
            f"({self.isolation}), {state}>"
        )

    # -- executor ------------------------------------------------------------------------
    def _check_held(self) -> None:
        if self.released:
            raise LeaseEnded(f"lease {self.id} was released")
        if self.ended == "idle" and self.reacquire:
            self._reacquire()
            return
        if self.ended:
            raise LeaseEnded(
                f"lease {self.id} was ended by the broker: {self.ended}", reason=self.ended
            )

    def refresh(self) -> None:
        """Re-read the lease (a replaced executor has a new endpoint)."""
        self._apply_lease(self.broker.lease(self.id)["lease"])

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        """Round trip to the lease's executor, signed with the lease key."""
        return self._executor_call("ping", {}, timeout)

    def _executor_call(self, msg_type: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request to the executor; if it does not answer and the broker has replaced it
        meanwhile (a new generation), the request goes once more to the new one."""
        self._check_held()
        if self._state.get("generation", 0) != self.generation:
            self.refresh()
        try:
            return self._call_endpoint(msg_type, body, timeout)
        except ExecutorUnavailable:
            endpoint = self.executor_endpoint
            self.refresh()
            if self.executor_endpoint == endpoint:
                raise
            return self._call_endpoint(msg_type, body, timeout)

    def _call_endpoint(self, msg_type: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.executor_endpoint is None:
            raise ExecutorUnavailable(f"lease {self.id} has no executor yet (it is starting)")
        channel = Channel(
            self.broker.context,
            self.executor_endpoint,
            self.key,
            self.id,
            timeout=timeout,
            unavailable=ExecutorUnavailable,
        )
        try:
            return channel.call(msg_type, body)
        finally:
            channel.close()

    # -- data plane -----------------------------------------------------------------------
    def _executor_gone(self) -> str | None:
        if self.ended:
            return f"the lease was ended by the broker ({self.ended})"
        if self._state.get("generation", 0) != self.generation:
            return "the broker replaced the executor"
        return None

    def _connection(self) -> ExecutorConnection:
        self._check_held()
        if self._state.get("generation", 0) != self.generation or self.executor_endpoint is None:
            self.refresh()
        conn = self._conn
        if conn is None or conn.generation != self.generation or conn.lost:
            if conn is not None:
                conn.close()
            if self.executor_endpoint is None:
                raise ExecutorUnavailable(f"lease {self.id} has no executor yet (it is starting)")
            conn = ExecutorConnection(
                self.broker.context,
                self.executor_endpoint,
                self.key,
                self.id,
                self.executor_pid,
                self.generation,
                self._arena,
                self._executor_gone,
                route=self._route,
                inherits=self._inherit,
            )
            self._inherit = frozenset()
            self._conn = conn
        return conn

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        to_host: bool = False,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Invocation:
        """Start ``fn(*args, **kwargs)`` on the slice and return its future; several may be in
        flight (the executor stages the inputs of the next while the current one computes)."""
        if not callable(fn):
            raise TypeError(f"run/submit needs a function, got {type(fn).__name__}")
        return self._connection().submit("invoke", fn, (args, kwargs), {}, to_host, timeout)

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        to_host: bool = False,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn`` on the slice. Device arrays in the result come back as RemoteArray (numpy
        with ``to_host=True``); inside ``fn``, ``xp`` is the slice's array module."""
        return self.submit(fn, *args, to_host=to_host, timeout=timeout, **kwargs).result()

    # Call-level remoting, as the original system remotes CUDA calls.
    def put(self, array: np.ndarray) -> RemoteArray:
        """Copy a host array to the slice."""
        return (
            self._connection()
            .submit("call", None, (np.asarray(array),), {"op": "put"}, False, None)
            .result()
        )

    def alloc(self, shape: int | tuple[int, ...], dtype: Any = "float32") -> RemoteArray:
        """A zero-filled device array on the slice."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return (
            self._connection()
            .submit("call", None, (shape, np.dtype(dtype).str), {"op": "alloc"}, False, None)
            .result()
        )

    def get(self, array: RemoteArray) -> np.ndarray:
        return array.get()

    def free(self, array: RemoteArray | RemoteObject) -> None:
        array.free()

    def launch(
        self,
        source: str,
        name: str,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: tuple[Any, ...],
    ) -> None:
        """Compile (once per executor) and launch a CUDA C kernel; GPU slices only."""
        self._connection().submit(
            "call",
            None,
            (source, name, tuple(grid), tuple(block), tuple(args)),
            {"op": "launch"},
            False,
            None,
        ).result()

    # -- ending --------------------------------------------------------------------------
    def release(self) -> None:
        """Give the slice back. A second release raises LeaseEnded."""
        if self.released:
            raise LeaseEnded(f"lease {self.id} was already released by this session")
        self.released = True
        self._stop.set()
        _open_sessions.discard(self)
        if self._conn is not None:
            self._conn.close()
        self._arena.close()
        try:
            self.broker.release(self.id)
        finally:
            if self._owns_broker:
                self.broker.close()

    def close(self) -> None:
        """Release if still held; never raises for a lease that already ended."""
        if not self.released:
            with contextlib.suppress(LeaseEnded):
                self.release()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _release_open_sessions() -> None:
    for session in list(_open_sessions):
        # If the broker is gone, its heartbeat check reclaims the slice.
        with contextlib.suppress(MigKernelError):
            session.close()


def connect(
    profile: str | None = None,
    *,
    memory: int | None = None,
    wait: bool = True,
    timeout: float | None = None,
    broker: str | os.PathLike[str] | None = None,
    on_queued: QueuedCallback | None = None,
    on_reacquire: Callable[[dict[str, Any]], None] | None = None,
    reacquire: bool = True,
) -> Session:
    """Lease a slice from the node broker (found via ``broker``, ``$MIG_KERNEL_BROKER`` or the
    default state dir) and return the Session holding it.

    After an idle reclaim the session's next call leases again and restores its device data
    (``on_reacquire`` is told how long that took); ``reacquire=False`` raises LeaseEnded
    instead."""
    client = BrokerClient(broker)
    try:
        lease = client.acquire(
            profile, memory=memory, wait=wait, timeout=timeout, on_queued=on_queued
        )
    except BaseException:
        client.close()
        raise
    return Session(
        client,
        lease,
        request={"profile": profile, "memory": memory},
        reacquire=reacquire,
        on_reacquire=on_reacquire,
    )
