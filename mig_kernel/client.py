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
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import zmq

from .channel import Channel, error_of
from .remote import ExecutorConnection, Invocation, RemoteArray, RemoteObject, Route
from .wire.arena import Arena
from .wire.connection import (
    AUTH_PEERCRED,
    ConnectionInfo,
    connection_file_path,
    read_connection_file,
)
from .wire.errors import (
    AcquireTimeout,
    AuthenticationError,
    BrokerUnavailable,
    ExecutorUnavailable,
    LeaseEnded,
    LeaseNotFound,
    MigKernelError,
)
from .wire.messages import is_unknown_sender
from .wire.reach import check_reachable

# (position, queue length, why it waits: one line naming, at the user's limit, their notebooks)
QueuedCallback = Callable[[int, int, str], None]
ENV_HUB_TOKEN = "JUPYTERHUB_API_TOKEN"  # set by JupyterHub for a user's server and its kernels
EXECUTOR_REPLACE_WAIT = 60.0  # seconds a call waits for the broker to replace a lost executor
NO_WAIT_ANSWER = 10.0  # seconds an acquire(wait=False) without timeout waits for any answer
ENV_SESSION_NAME = "JPY_SESSION_NAME"  # jupyter_server: the notebook path of a kernel it starts


T = TypeVar("T")


def notebook_label(env: Mapping[str, str] | None = None) -> str | None:
    """What the user calls the process holding a lease: the notebook of a kernel that
    jupyter_server started (``$JPY_SESSION_NAME``, with the home directory written ``~``).
    The broker names it when the user's slices hold back another request of theirs."""
    path = (os.environ if env is None else env).get(ENV_SESSION_NAME)
    if not path:
        return None
    home = os.path.expanduser("~")
    if home not in ("", "/") and path.startswith(home + os.sep):
        return "~" + path[len(home) :]
    return path


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
        if credentials is None:
            # Opening a session: if the broker's socket refuses this process outright, say why
            # now (ZeroMQ would retry in silence until the timeout). A fork or a pooled client
            # reuses a session the broker already answered, and must ride out a broker restart.
            check_reachable(self.info, connection_file_path(connection_file))
        try:
            self.channel = Channel(
                self.context, self.info.endpoint, self.info.key_bytes, None, timeout=timeout
            )
        except zmq.ZMQError as exc:  # an endpoint ZeroMQ cannot parse: the file is damaged
            raise BrokerUnavailable(
                f"cannot connect to {self.info.endpoint} named in "
                f"{connection_file_path(connection_file)}: {exc}"
            ) from None
        self.claims = claims
        self.owns_session = credentials is None  # a fork shares another client's session
        if credentials is None:
            try:
                self._hello()
            except BaseException:
                self.channel.close()
                raise
        else:
            self.session = {}
            self.client_id, self.key = credentials
            self.channel.key, self.channel.sender = self.key, self.client_id

    def _hello(self) -> None:
        """Open a client session (again, after the broker dropped an idle one)."""
        with self.channel.lock:
            self.channel.key, self.channel.sender = self.info.key_bytes, None
            hello = self.channel.call("hello", self._hello_body(self.claims))
            self.session: dict[str, Any] = hello
            self.client_id: str = hello["client_id"]
            self.key: bytes = bytes.fromhex(hello["client_key"])
            self.channel.key, self.channel.sender = self.key, self.client_id

    def _session_call(self, call: Callable[[], T]) -> T:
        """``call()``; if the broker dropped this client's idle session (client_expiry.py),
        open a new one and call once more."""
        try:
            return call()
        except AuthenticationError as exc:
            if not self.owns_session or not is_unknown_sender(exc):
                raise
        self._hello()
        return call()

    def _hello_body(self, claims: dict[str, Any] | None) -> dict[str, Any]:
        """Who this process says it is. A multi-user broker also gets the JupyterHub API token
        of the server that started this process, if any: where hub users share one OS user, it
        is how the broker tells them apart (it asks the hub whose token it is). The token goes
        to no other broker: a single-user one identifies by its own key file."""
        body: dict[str, Any] = {"user": getpass.getuser(), "pid": os.getpid()}
        token = os.environ.get(ENV_HUB_TOKEN)
        if token and self.info.auth == AUTH_PEERCRED:
            body["hub_token"] = token
        return {**body, **(claims or {})}

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
        return self._session_call(lambda: self.channel.call(msg_type, body, timeout=timeout))

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
        idle_timeout: float | None = None,
        tag: str | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        """Lease a slice; waits in the broker's FIFO queue unless ``wait=False``. ``restore``
        names an idle-reclaimed (or suspended) lease whose spilled device data the new executor
        loads (the reply's ``restored`` says how it went). ``idle_timeout`` asks for a shorter
        idle reclaim than the broker's; ``tag`` labels the lease for ``leases(tag=...)``;
        ``label`` is what the user calls its holder (default: this kernel's notebook).

        While queued the request is re-sent every ``queue_keepalive`` seconds (the broker drops
        waiters that stop doing so, and a restarted broker learns of the waiter again); each
        answer reports the position and why it waits (a request beyond the user's limit waits
        for one of their own slices, which the answer names). An interrupt or the timeout
        cancels the request.
        """
        body = {
            "profile": profile,
            "memory": memory,
            "wait": wait,
            "timeout": timeout,
            "ticket": "T-" + os.urandom(8).hex(),
            "restore": restore,
            "idle_timeout": idle_timeout,
            "tag": tag,
            "label": label or notebook_label(),
        }
        return self._session_call(lambda: self._acquire(body, timeout, on_queued))

    def _acquire(
        self, body: dict[str, Any], timeout: float | None, on_queued: QueuedCallback | None
    ) -> dict[str, Any]:
        keepalive = float(self.session.get("queue_keepalive", 1.0))
        deadline = time.monotonic() + timeout if timeout is not None else None
        # An acquire that may not wait is answered at once by a live broker: without an
        # answer for NO_WAIT_ANSWER seconds (a restart fits in), the broker is gone.
        no_wait = not body["wait"] and timeout is None
        answer_by = time.monotonic() + NO_WAIT_ANSWER if no_wait else None
        channel = self.channel
        with channel.lock:
            sent: set[bytes] = set()
            try:
                while True:
                    latest = channel.send("acquire", body)
                    sent.add(latest)
                    turn_end = time.monotonic() + keepalive
                    if deadline is not None:
                        turn_end = min(turn_end, deadline)
                    while True:  # listen until the grant comes or the turn ends
                        try:
                            msg = channel.receive_any(lambda m: m.re in sent, turn_end)
                        except BrokerUnavailable:
                            break  # the turn is over: send the keepalive
                        if msg.type == "error" and msg.body.get("code") == "replayed_message":
                            # A keepalive queued while the broker was down (or stalled) arrived
                            # stale: not an error of the request. Send a fresh one now if the
                            # latest was refused; older ones are already superseded.
                            if msg.re == latest:
                                break
                            continue
                        if msg.type == "error":
                            raise error_of(msg)
                        reply = msg.body
                        if reply.get("status") == "granted":
                            return {**reply["lease"], "restored": reply.get("restored")}
                        if on_queued is not None:
                            on_queued(
                                int(reply["position"]),
                                int(reply["queue_length"]),
                                str(reply.get("reason") or ""),
                            )
                    if deadline is not None and time.monotonic() >= deadline:
                        raise AcquireTimeout(f"no slice granted within {timeout:g} s")
                    if answer_by is not None and time.monotonic() >= answer_by:
                        raise BrokerUnavailable(
                            f"the broker did not answer within {NO_WAIT_ANSWER:g} s; check that "
                            f"it runs (`mig-kernel status`)"
                        )
            except BaseException:
                self._cancel(body["ticket"])
                raise

    def _cancel(self, ticket: str) -> None:
        """Withdraw a queued request (and give back a grant that crossed the cancel)."""
        # If the broker is gone, the queue entry dies with its keepalives anyway.
        with contextlib.suppress(MigKernelError):
            self.channel.call("cancel", {"ticket": ticket}, timeout=2.0)

    def release(self, lease_id: str, *, spill: bool = False) -> dict[str, Any]:
        """End a lease; with ``spill`` its device data is first saved for a later restore."""
        if spill:
            return self.request("release", timeout=180.0, lease_id=lease_id, spill=True)
        return self.request("release", lease_id=lease_id)

    def leases(self, tag: str | None = None) -> list[dict[str, Any]]:
        """The caller's active leases (only those labelled ``tag`` if given)."""
        return self.request("leases", tag=tag)["leases"]

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
            if not _note_heartbeat(state, reply):
                return
    finally:
        broker.close()


def _note_heartbeat(state: dict[str, Any], reply: dict[str, Any]) -> bool:
    """Record a heartbeat answer in a Session's state; False once the lease has ended."""
    if reply.get("state") == "active":
        state["idle_seconds"] = reply.get("idle_seconds")
        state["idle_at"] = time.monotonic()
        state["generation"] = reply.get("generation", 0)
        state["replaced"] = reply.get("replaced")
        return True
    state["ended"] = reply.get("reason") or reply.get("state")
    return False


# Lease end reasons whose device data was saved for a restore: idle reclaim, suspend, an
# executor that left without broker and holder (orphaned), or one a broker found running
# unknown to its rebuilt database (state_lost). The next call leases again and restores.
RESTORABLE = ("idle", "suspended", "orphaned", "state_lost")


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
        on_queued: QueuedCallback | None = None,
    ):
        self.broker = broker
        self._owns_broker = owns_broker
        self.request = {
            "profile": None,
            "memory": None,
            "idle_timeout": None,
            "tag": None,
            "label": None,
            **(lease.get("request") or {}),
            **(request or {}),
        }
        self.reacquire = reacquire  # after an idle reclaim, lease again on the next call
        self.on_reacquire = on_reacquire
        self.on_queued = on_queued  # told the queue position while a re-acquire waits
        self.reacquired: dict[str, Any] | None = None
        self._apply_lease(lease)
        self.released = False
        self.detached = False
        self._last_call = time.monotonic()
        self._held_epochs: frozenset[int] = frozenset()  # handle epochs kept over a suspend
        self._arena = Arena(self.id.removeprefix("L-"))
        self._route = Route(connect=self._connection, where=self._where)
        self._conn: ExecutorConnection | None = None
        self._inherit: frozenset[int] = frozenset()  # handle epochs the next connection keeps
        self._start_heartbeat(lease)
        _open_sessions.add(self)

    def _where(self) -> str:
        """The slice this session's data is on, as RemoteArray's repr names it."""
        return f"{self.slice['id']} ({self.profile})"

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
        inherited = self._conn.epochs if self._conn is not None else self._held_epochs
        lease = self.broker.acquire(
            self.request.get("profile"),
            memory=self.request.get("memory"),
            idle_timeout=self.request.get("idle_timeout"),
            tag=self.request.get("tag"),
            label=self.request.get("label"),
            restore=old_id,
            on_queued=self.on_queued,
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
        self._idle_limit = float(lease.get("idle_timeout") or 0.0)  # idle_timeout, kept

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
        """Why the lease ended (``idle``, ``suspended``, ``holder_lost``...), None while held."""
        return self._state["ended"]

    @property
    def idle_seconds(self) -> float | None:
        """Seconds since the slice last did work for this lease, as of the last heartbeat."""
        return self._state.get("idle_seconds")

    @property
    def executor_lost(self) -> str | None:
        """Why the connection to the lease's executor was lost (its device data with it), or
        None while it works; an interrupted call says so to the user."""
        conn = self._conn
        return conn.lost if conn is not None else None

    @property
    def idle_timeout(self) -> float:
        """Seconds of idleness after which the broker reclaims the slice (0: never)."""
        return self._idle_limit

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
        if self.detached:
            raise LeaseEnded(f"lease {self.id} was detached from this session")
        if self.released:
            raise LeaseEnded(f"lease {self.id} was released")
        state = self._state
        if state["ended"] is None and self._near_idle_reclaim():
            # The broker may be reclaiming it right now: ask instead of racing the reclaim.
            with contextlib.suppress(MigKernelError):
                _note_heartbeat(state, self.broker.heartbeat([self.id]).get(self.id, {}))
        ended = state["ended"]
        if not ended:
            return
        if ended in RESTORABLE and self.reacquire:
            self._reacquire()
            return
        raise LeaseEnded(f"lease {self.id} was ended by the broker: {ended}", reason=ended)

    def _near_idle_reclaim(self, margin: float = 1.0) -> bool:
        """Whether the lease may have been idle for about its idle timeout by now."""
        limit = self._idle_limit
        if limit <= 0:
            return False
        now = time.monotonic()
        idle = now - self._last_call
        if idle <= limit - margin:  # (the heartbeat's figure can only make it shorter)
            return False
        seen, at = self._state.get("idle_seconds"), self._state.get("idle_at")
        if seen is not None and at is not None:
            idle = min(idle, float(seen) + now - at)
        return idle > limit - margin

    def refresh(self) -> None:
        """Re-read the lease (a replaced executor has a new endpoint). The broker's answer is
        as new as any heartbeat's: the generation it names is the one to talk to, so a
        connection to it is not taken for one to a replaced executor."""
        self._apply_lease(self.broker.lease(self.id)["lease"])
        self._state["generation"] = self.generation

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
            replaced = self._state.get("replaced")  # why, as the broker said
            return "the broker replaced the executor" + (f": {replaced}" if replaced else "")
        return None

    def _connection(self) -> ExecutorConnection:
        self._check_held()
        if self._conn is not None and self._conn.lost and self._conn.generation == self.generation:
            self._await_replacement()
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

    def _await_replacement(self, limit: float = EXECUTOR_REPLACE_WAIT) -> None:
        """The executor died or was stopped (a call past its timeout): the broker starts a new
        one for the lease (a new generation). Wait for it, so the next call goes there instead
        of failing again on the dead one; after ``limit`` seconds the call finds out itself."""
        deadline = time.monotonic() + limit
        lost = self.generation
        while time.monotonic() < deadline:
            self.refresh()
            if self.generation != lost and self.executor_endpoint is not None:
                self._state["generation"] = self.generation  # before the next heartbeat says so
                return
            time.sleep(0.1)

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
        conn = self._connection()
        self._last_call = time.monotonic()
        return conn.submit("invoke", fn, (args, kwargs), {}, to_host, timeout)

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        to_host: bool = False,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn`` on the slice. Device arrays in the result come back as RemoteArray (numpy
        with ``to_host=True``); inside ``fn``, ``xp`` is the slice's array module.

        A call that meets the slice being reclaimed for idleness (the executor refuses it, or
        has just exited after saving the data) never ran: it is sent again after the
        re-acquire, once."""
        invocation = self.submit(fn, *args, to_host=to_host, timeout=timeout, **kwargs)
        try:
            return invocation.result()
        except (LeaseEnded, ExecutorUnavailable) as exc:
            if not self._reclaimed_under(exc):
                raise
        return self.submit(fn, *args, to_host=to_host, timeout=timeout, **kwargs).result()

    def _reclaimed_under(self, exc: MigKernelError) -> bool:
        """Whether ``exc`` came from an idle reclaim (or suspend) that the call lost the race
        to; if so the Session now knows the lease ended, and re-acquires on its next call."""
        if not self.reacquire or self.released or self.detached:
            return False
        if isinstance(exc, LeaseEnded) and exc.details.get("reason") != "reclaimed":
            return False
        deadline = time.monotonic() + 180.0  # the spill may still be writing
        while self.ended is None and time.monotonic() < deadline:
            try:
                _note_heartbeat(self._state, self.broker.heartbeat([self.id]).get(self.id, {}))
            except MigKernelError:
                return False
            if self.ended is None:
                if not isinstance(exc, LeaseEnded):
                    return False  # the executor died but the lease lives: a real loss
                time.sleep(0.05)
        return self.ended in RESTORABLE

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

    def reset(self) -> int:
        """Free every device object the executor holds for this lease, also those of other
        processes that held it before (a restarted kernel's predecessor). Returns how many."""
        return int(self._connection()._call("reset", {}).get("freed", 0))

    # -- ending --------------------------------------------------------------------------
    def suspend(self) -> dict[str, Any]:
        """Give the slice back now but keep this session's device data: it is spilled to host
        storage (as on an idle reclaim), and the next call leases a slice again and restores
        it, so every RemoteArray keeps working. Returns the spill report."""
        self._check_held()
        self._stop.set()
        if self._conn is not None:
            self._held_epochs = self._conn.epochs
            self._conn.close()
            self._conn = None
        try:
            reply = self.broker.release(self.id, spill=True)
        finally:
            self._state["ended"] = "suspended"
        return dict(reply.get("spilled") or {})

    def detach(self) -> None:
        """Stop using the lease without ending it (heartbeats stop): another process of the
        same user (a restarted kernel) takes it over with ``attach``."""
        if self.released or self.detached:
            return
        self.detached = True
        self._stop.set()
        _open_sessions.discard(self)
        if self._conn is not None:
            self._conn.close()
        self._arena.close()
        if self._owns_broker:
            self.broker.close()

    def release(self) -> None:
        """Give the slice back. A second release raises LeaseEnded."""
        if self.detached:
            raise LeaseEnded(f"lease {self.id} was detached from this session")
        if self.released:
            raise LeaseEnded(f"lease {self.id} was already released by this session")
        self.released = True
        self._stop.set()
        _open_sessions.discard(self)
        if self._conn is not None:
            self._conn.close()
        self._arena.close()
        try:
            # An idle or suspended lease has ended already: releasing it discards its spill.
            self.broker.release(self.id)
        finally:
            if self._owns_broker:
                self.broker.close()

    def close(self) -> None:
        """Release if still held; never raises for a lease that already ended."""
        if not self.released and not self.detached:
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
    idle_timeout: float | None = None,
    tag: str | None = None,
) -> Session:
    """Lease a slice from the node broker (found via ``broker``, ``$MIG_KERNEL_BROKER`` or the
    default state dir) and return the Session holding it.

    After an idle reclaim the session's next call leases again and restores its device data
    (``on_reacquire`` is told how long that took); ``reacquire=False`` raises LeaseEnded
    instead. ``idle_timeout`` asks for a shorter idle reclaim than the broker's default;
    ``tag`` labels the lease so another process of the user can ``attach`` to it."""
    client = BrokerClient(broker)
    try:
        lease = client.acquire(
            profile,
            memory=memory,
            wait=wait,
            timeout=timeout,
            on_queued=on_queued,
            idle_timeout=idle_timeout,
            tag=tag,
        )
    except BaseException:
        client.close()
        raise
    return Session(
        client,
        lease,
        request={"profile": profile, "memory": memory, "idle_timeout": idle_timeout, "tag": tag},
        reacquire=reacquire,
        on_reacquire=on_reacquire,
        on_queued=on_queued,
    )


def attach(
    lease_id: str | None = None,
    *,
    tag: str | None = None,
    broker: str | os.PathLike[str] | None = None,
    on_reacquire: Callable[[dict[str, Any]], None] | None = None,
    on_queued: QueuedCallback | None = None,
) -> Session | None:
    """Take over a lease this user already holds (acquired by another process, such as a
    kernel's provisioner or the kernel before a restart), by id or by tag; None if there is no
    such active lease. The Session heartbeats it from now on."""
    client = BrokerClient(broker)
    try:
        if lease_id is not None:
            lease: dict[str, Any] | None = client.lease(lease_id)["lease"]
        else:
            lease = next(iter(client.leases(tag=tag)), None)
    except (LeaseEnded, LeaseNotFound):
        lease = None
    except BaseException:
        client.close()
        raise
    if lease is None:
        client.close()
        return None
    return Session(client, lease, on_reacquire=on_reacquire, on_queued=on_queued)
