"""The node broker: inventory, leases, queue, warm pool, persistence, metrics and watch stream.

One thread, one ZeroMQ poll loop, no locks. Each loop turn handles the requests and executor
replies that arrived, runs the timers, commits SQLite once, and only then sends the replies it
collected (group commit: nothing a client was told can be lost by a crash). Dispatch is
table-driven: request type ``x`` is handled by ``request_x``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import socket
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import start_http_server
from traitlets import Bool, Enum, Float, Int, List, Type, Unicode, default
from traitlets.config import LoggingConfigurable

from .. import __version__
from ..slices.model import ApplyRefused, Inventory, SliceInfo
from ..wire import errors as E
from ..wire.connection import (
    AUTH_KEY,
    AUTH_PEERCRED,
    SYSTEM_STATE_DIR,
    ConnectionInfo,
    bind_private,
    default_state_dir,
    ipc_endpoint,
)
from ..wire.limits import BROKER_MESSAGE_MAX, WATCH_MESSAGE_MAX, check_body, limit_frames
from ..wire.messages import Message, decode, encode, error_body, handler_name, refusal
from ..wire.paths import UnsafePath, private_dir, unlink_quietly
from ..wire.peercred import PeerCredentials, peer_credentials
from ..wire.signing import ReplayGuard, new_key
from ..wire.transport import IPC, TRANSPORTS, transport_of
from . import client_expiry, executor_watch, upkeep
from . import policy as P
from .gpu_lock import default_lock_dir
from .identity import (
    Identity,
    IdentityProvider,
    LocalUserIdentity,
    PeerCredentialIdentity,
    group_names,
    pseudonym,
)
from .metrics import BrokerMetrics
from .places import BrokerStartError, Places, check_privileges
from .policy import LeasePolicy
from .pool import ExecutorPool
from .registry import ExecutorRegistry
from .state import (
    FREE,
    Client,
    Executor,
    Lease,
    Request,
    SliceRecord,
    Ticket,
    new_id,
    slice_state,
)
from .storage_guard import open_state
from .sweeper import RuntimeDirWatch, sweep_sockets

log = logging.getLogger("mig_kernel.broker")

MAX_BATCH = 512  # requests handled per loop turn before timers and the commit get their turn


@dataclass
class Incoming:
    route: bytes
    msg: Message
    client: Client | None
    key: bytes
    received: float
    peer: PeerCredentials | None = None  # who connected, as the kernel says (ipc only)


@dataclass
class PendingGrant:
    """A grant whose reply waits for its executor: to become the holder (multi-user), then to
    load the spill of the lease it restores."""

    route: bytes
    reply_to: bytes
    key: bytes
    lease_id: str
    restore_path: str | None
    user: str


DEFERRED = None  # a handler that answers later (queued acquire) returns this


class Broker(LoggingConfigurable):
    state_dir = Unicode(
        "", help="Directory of the broker's SQLite state, connection file and logs."
    ).tag(config=True)
    idle_timeout = Float(
        600.0, help="Seconds without GPU work after which a lease is reclaimed (0: never)."
    ).tag(config=True)
    heartbeat_interval = Float(
        5.0, help="Seconds between a client's heartbeats (told to clients at hello)."
    ).tag(config=True)
    heartbeat_misses = Int(
        3,
        help="Missed heartbeats after which the holder counts as gone and its lease is reclaimed.",
    ).tag(config=True)
    multi_user = Bool(
        False,
        help="Serve every local user (`mig-kernel broker --multi-user`): run as root (or a "
        "service user with CAP_SETUID, CAP_SETGID, CAP_CHOWN and CAP_KILL); users are "
        "identified by their socket's credentials (SO_PEERCRED), the connection file "
        "<runtime_dir>/broker.json is public and holds no secret, and each executor becomes "
        "its lease holder's uid before it serves them. Default: a single-user broker for the "
        "OS user running it.",
    ).tag(config=True)
    runtime_dir = Unicode(
        "",
        help="Directory of the broker's sockets (multi-user: also its public broker.json). "
        "Default: /run/mig-kernel with --multi-user; else a private directory derived from the "
        "state dir ($XDG_RUNTIME_DIR/mig-kernel-<hash>, or <state_dir>/run).",
    ).tag(config=True)
    spill_dir = Unicode(
        "",
        help="Where idle leases' device data is saved for a restore. Default: <state_dir>/spill "
        "(single-user); with --multi-user, <state_dir>-spill, a 0711 directory with one 0700 "
        "directory per user owned by that user (the executors write there as the user).",
    ).tag(config=True)
    lock_dir = Unicode(
        help="Directory of the node-wide per-GPU locks that keep a second broker off a GPU "
        "this one serves. Default: $MIG_KERNEL_LOCK_DIR, else /run/lock."
    ).tag(config=True)
    executor_env = List(
        Unicode(),
        [
            "PATH",
            "LANG",
            "LANGUAGE",
            "LC_*",
            "TZ",
            "PYTHONPATH",
            "LD_LIBRARY_PATH",
            "CUDA_*",
            "CUPY_*",
            "NCCL_*",
            "OMP_NUM_THREADS",
            "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
        ],
        help="With --multi-user, the broker's environment variables its executors get (names; "
        "NAME* for a prefix); nothing else of the service's environment reaches tenant code.",
    ).tag(config=True)
    replay_window = Float(
        30.0, help="Seconds a message timestamp may be off; message ids are remembered this long."
    ).tag(config=True)
    queue_keepalive = Float(
        1.0, help="Seconds between a queued client's keepalives (it re-sends its acquire)."
    ).tag(config=True)
    queue_keepalive_misses = Int(
        5, help="Missed keepalives after which a queued request is dropped."
    ).tag(config=True)
    executor_start_timeout = Float(
        120.0, help="Seconds an executor may take to warm up before it is killed."
    ).tag(config=True)
    max_executor_failures = Int(
        3, help="Consecutive failed executor starts after which a slice is marked broken."
    ).tag(config=True)
    stats_interval = Float(
        2.0,
        help="Seconds between activity/memory polls of executors (also how they are "
        "seen to answer: executor_watch.py).",
    ).tag(config=True)
    executor_answer_timeout = Float(
        30.0,
        help="Seconds a ready executor may leave the broker's requests unanswered before it "
        "counts as hung (stopped, or wedged in code that never lets its watcher thread run) "
        "and is replaced; its lease holder is told why. A long call does not count.",
    ).tag(config=True)
    publish_interval = Float(
        0.2, help="Minimum seconds between two state publications on the watch stream."
    ).tag(config=True)
    lease_history = Int(10000, help="Ended leases kept in the state database.").tag(config=True)
    client_expiry = Float(
        7 * 86400.0,
        help="Seconds after its last request when a client session without a lease or queued "
        "request is dropped (0: never); the client opens a new one with hello.",
    ).tag(config=True)
    sessions_per_user = Int(
        256,
        help="Client sessions one user may hold; opening another drops their longest-unused "
        "session without a lease or queued request (0: no limit).",
    ).tag(config=True)
    spill_timeout = Float(
        120.0, help="Seconds an idle lease's executor may take to spill its device data."
    ).tag(config=True)
    metrics_port = Int(
        0,
        help="Serve Prometheus metrics over HTTP on 127.0.0.1:PORT for scraping (0: off; the "
        "`metrics` request and `mig-kernel metrics` work either way).",
    ).tag(config=True)
    executor_transport = Enum(
        list(TRANSPORTS),
        IPC,
        help="How clients reach executors. ipc (default): a 0600 socket file in the broker's "
        "private runtime dir, array data through the shared-memory arena. tcp: a port on "
        "127.0.0.1, array data in the signed messages themselves (what network API remoting "
        "costs; any local user can connect, every message is still signed and replay-guarded).",
    ).tag(config=True)
    orphan_grace = Float(
        300.0,
        help="Seconds an executor lives on without this broker and without a live lease "
        "holder (a broker killed and never restarted); it then saves a held lease's device "
        "data to the spill dir and exits. 0: executors never leave by themselves.",
    ).tag(config=True)
    sweep_interval = Float(
        30.0,
        help="Seconds between sweeps of what dead processes leave behind: arena segments of "
        "clients that are gone, socket files of executors that are gone (broker/sweeper.py).",
    ).tag(config=True)
    identity_provider_class = Type(
        klass=IdentityProvider,
        help="Who callers are (see identity.py). Default: LocalUserIdentity, or "
        "PeerCredentialIdentity with --multi-user.",
    ).tag(config=True)

    @default("identity_provider_class")
    def _default_identity_provider(self) -> type[IdentityProvider]:
        return PeerCredentialIdentity if self.multi_user else LocalUserIdentity

    @default("lock_dir")
    def _default_lock_dir(self) -> str:
        return os.environ.get("MIG_KERNEL_LOCK_DIR") or str(default_lock_dir())

    def __init__(self, inventory: Inventory, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inventory = inventory
        self.metrics = BrokerMetrics()
        self.slices: dict[str, SliceRecord] = {}
        self.executors: dict[str, Executor] = {}
        self.leases: dict[str, Lease] = {}  # active ones; ended leases live in SQLite only
        self.clients: dict[str, Client] = {}
        self.queue: list[Ticket] = []
        self.pending_grants: dict[str, PendingGrant] = {}  # lease id -> its grant, unanswered
        self.pending_suspends: dict[str, tuple[bytes, bytes, bytes]] = {}  # lease -> reply to
        self.outbox: list[tuple[zmq.Socket, list[bytes]]] = []
        self.dirty = True
        self.seq = 0
        self.stopping = False
        self._timers: dict[str, float] = {}
        self._metrics_server: Any = None
        # Identity checks that ask another service (a hub): threads, answers on the loop.
        self._identity_checks = ThreadPoolExecutor(2, thread_name_prefix="mig-kernel-identity")
        self._pending_hellos: list[tuple[Future[Identity], Incoming]] = []

    # ================================================================== lifecycle
    def start(self) -> None:
        os.umask(0o077)  # SQLite, its WAL, logs, spill: the broker's files are its own
        default_dir = SYSTEM_STATE_DIR if self.multi_user else default_state_dir()
        self.state_path = Path(self.state_dir or default_dir).expanduser().resolve()
        if self.multi_user:
            check_privileges()
        self.places = Places(
            self.state_path,
            multi_user=self.multi_user,
            runtime_dir=self.runtime_dir,
            spill_dir=self.spill_dir,
            lock_dir=self.lock_dir,
        )
        self.places.prepare_state()
        self.store = open_state(self.state_path / "broker.sqlite")
        self.registry = ExecutorRegistry(self.state_path)
        user = "multi-user" if self.multi_user else os.environ.get("USER", "")
        self.places.lock_gpus(self.inventory.gpus(), user)
        self.connection_key = self._secret("connection_key")
        self.watch_key = self._secret("watch_key")
        self.pseudonym_secret = self._secret("pseudonym_secret")
        self.identity = self.identity_provider_class(parent=self)
        self.hello_key = self.identity.hello_key(self.connection_key)
        if getattr(self.identity, "shared_uids", None) and self.executor_transport == IPC:
            raise BrokerStartError(
                "hub users who share an OS uid get executors of their own uid, which cannot "
                "map their kernels' shared memory: run this broker with --executor-transport tcp"
            )
        self.policy = LeasePolicy(parent=self)
        if not self.multi_user and not self.policy.admin_users and self.identity.user:
            self.policy.admin_users = {self.identity.user}
        self.guard = ReplayGuard(self.replay_window)
        self.runtime_path = self.places.prepare_runtime(self.store)
        self.places.prepare_spill()
        socket_mode = 0o666 if self.multi_user else 0o600  # multi-user: the kernel says who
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        limit_frames(self.router, BROKER_MESSAGE_MAX)
        self.endpoint = ipc_endpoint(self.runtime_path, "broker.sock")
        bind_private(self.router, self.endpoint, socket_mode)
        self.pub = self.context.socket(zmq.PUB)
        self.pub.linger = 0
        limit_frames(self.pub, WATCH_MESSAGE_MAX)  # subscribers only send subscriptions
        self.watch_endpoint = ipc_endpoint(self.runtime_path, "watch.sock")
        bind_private(self.pub, self.watch_endpoint, socket_mode)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        log_dir = private_dir(self.state_path / "logs")
        self.pool = ExecutorPool(
            self.context,
            self.runtime_path,
            log_dir,
            start_timeout=self.executor_start_timeout,
            replay_window=self.replay_window,
            transport=self.executor_transport,
            multi_user=self.multi_user,
            env_keep=tuple(self.executor_env),
            tag=self.registry.tag,
            orphan_grace=self.orphan_grace,
            spill_root=str(self.places.spill_root),
        )
        self.runtime_watch = RuntimeDirWatch(self.runtime_path, ("broker.sock", "watch.sock"))
        self._restore()
        upkeep.sweep(self)
        self.store.commit()
        if self.metrics_port:
            self._metrics_server = start_http_server(
                self.metrics_port, addr="127.0.0.1", registry=self.metrics.registry
            )
        self.connection_info = ConnectionInfo(
            endpoint=self.endpoint,
            watch_endpoint=self.watch_endpoint,
            key="" if self.multi_user else self.connection_key.hex(),  # public: no secret
            pid=os.getpid(),
            state_dir=str(self.state_path),
            user=self.identity.user,
            version=__version__,
            auth=AUTH_PEERCRED if self.multi_user else AUTH_KEY,
        )
        self.places.write_connection(self.connection_info)
        self.log.info(
            "broker serving %d slice(s) (%s backend, %s) at %s",
            len(self.slices),
            self.inventory.backend,
            "multi-user" if self.multi_user else f"user {self.identity.user}",
            self.endpoint,
        )

    def _spill_path(self, lease: Lease) -> Path:
        """Where a lease's device data goes (places.py): multi-user, a directory of its owner."""
        owner = (
            self.identity.executor_account(lease.owner, self._owner_uid(lease))
            if self.multi_user
            else None
        )
        return self.places.spill_path(lease.id, owner)

    def _secret(self, name: str) -> bytes:
        value = self.store.meta(name)
        if value is None:
            value = new_key().hex()
            self.store.set_meta(name, value)
        return bytes.fromhex(value)

    def _restore(self) -> None:
        """Rebuild from SQLite after a start or a SIGKILL: keep every lease, re-adopt live
        executors, replace dead ones."""
        now = time.time()
        self.store.prune_clients(now - 7 * 86400)
        self.store.prune_history(self.lease_history)
        self.slices = self.store.load_slices()
        for record in self.slices.values():
            record.broken = None  # a restart is a retry
        self.clients = self.store.load_clients()
        for client in self.clients.values():  # today's groups and admins, not the sign-in's
            if self.multi_user:  # OS users' groups (a hub user's come from the hub at hello)
                client.groups = group_names(client.user) or client.groups
            # A demoted admin loses the right now; a hub admin regains it at the next hello.
            client.admin = self.policy.is_admin(replace(client.identity, admin=False))
        self.leases = self.store.load_active_leases(now)
        self._reconcile(self.inventory.slices())
        for lease in list(self.leases.values()):
            record = self.slices.get(lease.slice_id)
            if record is None:
                self._end_lease(lease, "slice_gone")
            else:
                record.lease_id = lease.id
        for row in self.store.load_executors():
            record = self.slices.get(row["slice_id"])
            ex = None
            if record is not None and record.executor_id is None:
                ex = self.pool.adopt(row)
            if ex is None:
                self.store.delete_executor(row["id"])
                lease = self.leases.get(record.lease_id or "") if record else None
                if lease is not None and upkeep.left_orphaned(self, lease):
                    continue  # its executor saved its data and left: the owner can restore it
                if lease is not None:  # its executor died during the outage: a new one comes
                    lease.generation += 1
                    self.store.update_lease_generation(lease)
                continue
            self._register_executor(ex, record)
            self.log.info("re-adopted executor %s (pid %d) on %s", ex.id, ex.pid, ex.slice_id)
        upkeep.stop_strays(self)  # executors the database does not know: before any grant
        for record in self.slices.values():
            self._ensure_executor(record)

    def _reconcile(self, infos: list[SliceInfo]) -> None:
        """Make the slice records match the inventory: same uuid keeps its record."""
        fresh = {info.id: info for info in infos}
        for slice_id, record in list(self.slices.items()):
            info = fresh.get(slice_id)
            if info is None or info.uuid != record.info.uuid:
                self._remove_slice(record)
        for info in infos:
            record = self.slices.get(info.id)
            if record is None:
                record = SliceRecord(info)
                self.slices[info.id] = record
            else:
                record.info, record._public = info, None
            self.store.save_slice(record)
        self.dirty = True

    def _remove_slice(self, record: SliceRecord) -> None:
        if record.lease_id and record.lease_id in self.leases:
            self._end_lease(self.leases[record.lease_id], "slice_gone")
        ex = self.executors.get(record.executor_id or "")
        if ex is not None:
            self.pool.stop(ex)
            self.pool.kill(ex)
            self._forget_executor(ex)
        self.slices.pop(record.info.id, None)
        self.store.delete_slice(record.info.id)

    def serve_forever(self) -> None:
        try:
            while not self.stopping:
                self.run_once()
        finally:
            self.shutdown()

    def stop(self) -> None:
        """Ask the loop to finish its turn and shut down (safe from a signal handler)."""
        self.stopping = True

    def shutdown(self) -> None:
        """Graceful stop: end every lease, stop every executor, remove the connection file."""
        if not hasattr(self, "store"):
            return
        self.stopping = True
        if not self.store.flush():  # never stop executors because state cannot be written
            upkeep.shutdown_degraded(self)
            return
        for lease in list(self.leases.values()):
            self._end_lease(lease, "broker_stopped")
        self._cancel_queue()
        executors = list(self.executors.values())
        for ex in executors:
            self.pool.stop(ex, grace=3.0)
        self._flush()
        deadline = time.time() + 3.0
        while time.time() < deadline and any(self.pool.alive(ex) for ex in executors):
            time.sleep(0.02)
        for ex in executors:
            self.pool.kill(ex)
            self._forget_executor(ex)
        if not self.store.close():
            self.log.error("the state of this stop could not be written: %s", self.store.reason)
        sweep_sockets(self.runtime_path, ())  # killed adopted executors cannot remove theirs
        self._close_endpoints()

    def _close_endpoints(self) -> None:
        """The end of every stop: sockets, their files, metrics server, connection file."""
        if self._metrics_server is not None:
            self._metrics_server[0].shutdown()
        self.router.close(linger=0)
        self.pub.close(linger=0)
        for endpoint in (self.endpoint, self.watch_endpoint):
            unlink_quietly(endpoint.removeprefix("ipc://"))
        self.context.term()
        del self.store
        self._identity_checks.shutdown(wait=False, cancel_futures=True)
        self.places.release()

    # ================================================================== loop
    def run_once(self, timeout_ms: int = 100) -> None:
        if self._pending_hellos:  # a worker's answer is due: look again soon
            timeout_ms = min(timeout_ms, 5)
        events = dict(self.poller.poll(timeout_ms))
        if events.pop(self.router, None):
            for _ in range(MAX_BATCH):
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                peer = peer_credentials(frames[-1])
                self._on_request(frames[0].bytes, [f.bytes for f in frames[1:]], peer)
        for sock in events:
            event = self.pool.receive(sock)
            if event is not None:
                self._on_executor_reply(*event)
        if self._pending_hellos:
            self._finish_hellos()
        self._run_timers()
        self.store.commit()
        self._flush()
        self._maybe_publish()

    def _flush(self) -> None:
        for sock, frames in self.outbox:
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(frames, zmq.NOBLOCK)
        self.outbox.clear()

    def _due(self, name: str, every: float, now: float) -> bool:
        if now >= self._timers.get(name, 0.0):
            self._timers[name] = now + every
            return True
        return False

    def _run_timers(self) -> None:
        now = time.time()
        if self._due("executors", 0.1, now):
            self._check_executors(now)
        if self._due("leases", 0.5, now):
            self._check_leases(now)
            self._check_queue(now)
        if self._due("clients", min(5.0, max(self.client_expiry / 2, 0.5)), now):
            busy = client_expiry.busy_ids(self.leases.values(), self.queue)
            self._drop_clients(
                client_expiry.expired(self.clients.values(), busy, now, self.client_expiry)
            )
        if self._due("stats", self.stats_interval, now):
            for ex in self.executors.values():
                if ex.phase == "ready" and ex.socket is not None:
                    holder = upkeep.holder_of(self, ex) if ex.key_lease is not None else None
                    self.pool.request_stats(ex, holder)
            hung = executor_watch.unresponsive(
                self.pool, self.executors.values(), now, self.executor_answer_timeout
            )
            for ex, why in hung:
                self.log.warning("executor %s on %s: %s", ex.id, ex.slice_id, why)
                ex.gone_reason = why
                ex.deadline = float("inf")
                self.pool.kill(ex)  # _check_executors replaces it and tells its lease why
        if self._due("runtime_dir", 1.0, now) and not self.runtime_watch.intact():
            upkeep.restore_runtime_dir(self)
        if self._due("sweep", self.sweep_interval, now):
            upkeep.sweep(self)

    # ================================================================== requests
    def _key_for(self, header: dict[str, Any]) -> bytes | None:
        sender = header.get("from")
        if sender is None and header.get("type") == "hello":
            return self.hello_key
        client = self.clients.get(sender) if isinstance(sender, str) else None
        return client.key if client else None

    def _client_key(self, client_id: str) -> bytes:
        client = self.clients.get(client_id)
        return client.key if client else self.hello_key

    def _on_request(
        self, route: bytes, frames: list[bytes], peer: PeerCredentials | None = None
    ) -> None:
        received = time.perf_counter()
        try:
            msg = decode(frames, self._key_for, None)
        except (E.AuthenticationError, E.MalformedMessage) as exc:
            self.metrics.rejected.labels(reason=exc.code).inc()
            self.outbox.append((self.router, [route, *refusal(str(exc))]))
            return
        client = self.clients.get(msg.sender or "")
        key = (
            self.hello_key
            if msg.type == "hello" and msg.sender is None
            else self._client_key(msg.sender or "")
        )
        try:
            reason = self.guard.check(msg.id, msg.ts)
            if reason:
                self.metrics.rejected.labels(reason="replayed_message").inc()
                raise E.ReplayedMessage(f"replayed or stale message refused: {reason}")
            if msg.type != "hello" and client is None:
                raise E.AuthenticationError("unknown client session: send hello first")
            check_body(msg.body)
            if client is not None:
                client.last_seen = time.time()
            if (
                client is not None
                and client.uid is not None
                and (peer is None or peer.uid != client.uid)
            ):
                # The session's key leaked to another uid: the kernel's word wins over the key.
                self.metrics.rejected.labels(reason="foreign_uid").inc()
                raise E.AuthenticationError(
                    "this client session belongs to another user: open your own with hello"
                )
            method = getattr(self, handler_name("request", msg.type), None)
            if method is None:
                raise E.UnknownRequest(f"unknown request type {msg.type!r}")
            body = method(Incoming(route, msg, client, key, received, peer))
        except E.MigKernelError as exc:
            self._reply_error(route, msg.id, key, exc)
            return
        except Exception as exc:
            self.log.exception("request %s failed", msg.type)
            self._reply_error(route, msg.id, key, E.InternalError(f"{type(exc).__name__}: {exc}"))
            return
        if body is not DEFERRED:
            self._reply(route, msg.id, key, body)

    def _reply(self, route: bytes, re: bytes, key: bytes, body: dict[str, Any]) -> None:
        self.outbox.append(
            (self.router, [route, *encode("reply", body, key, sender="broker", re=re)])
        )

    def _reply_error(self, route: bytes, re: bytes | None, key: bytes, exc: Exception) -> None:
        frames = encode("error", error_body(exc), key, sender="broker", re=re)
        self.outbox.append((self.router, [route, *frames]))

    # -- helpers for validating bodies --------------------------------------------------
    @staticmethod
    def _field(
        body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = ...
    ) -> Any:
        if name not in body or body[name] is None:
            if default is ...:
                raise E.BadRequest(f"field {name!r} is required")
            return default
        value = body[name]
        if not isinstance(value, kinds) or (
            isinstance(value, bool)
            and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))
        ):
            raise E.BadRequest(f"field {name!r} has the wrong type {type(value).__name__}")
        return value

    def _require_admin(self, req: Incoming) -> None:
        assert req.client is not None
        if not req.client.admin:
            raise E.NotPermitted(f"user {req.client.user!r} is not a broker admin")

    # -- session --------------------------------------------------------------------------
    def request_hello(self, req: Incoming) -> dict[str, Any] | None:
        """Open a client session. An identity that needs a slow check (a JupyterHub token the
        hub must confirm) is checked on a worker thread and the hello answered when it is
        done (``_finish_hellos``): the loop never waits for another service."""
        if self.identity.is_slow(req.msg.body, req.peer):
            future = self._identity_checks.submit(self.identity.identify, req.msg.body, req.peer)
            self._pending_hellos.append((future, req))
            return DEFERRED
        return self._open_session(self.identity.identify(req.msg.body, req.peer))

    def _finish_hellos(self) -> None:
        for future, req in list(self._pending_hellos):
            if not future.done():
                continue
            self._pending_hellos.remove((future, req))
            try:
                body = self._open_session(future.result())
            except E.MigKernelError as exc:
                self._reply_error(req.route, req.msg.id, req.key, exc)
            except Exception as exc:
                self.log.exception("identity check failed")
                error = E.InternalError(f"{type(exc).__name__}: {exc}")
                self._reply_error(req.route, req.msg.id, req.key, error)
            else:
                self._reply(req.route, req.msg.id, req.key, body)

    def _drop_clients(self, clients: list[Client]) -> None:
        for client in clients:
            del self.clients[client.id]
        if clients:
            self.store.delete_clients([c.id for c in clients])

    def _open_session(self, identity: Identity) -> dict[str, Any]:
        identity = replace(identity, admin=self.policy.is_admin(identity))
        self.policy.check_allowed(identity)
        self.store.require(room=1)  # while degraded, sessions only up to the journal's bound
        busy = client_expiry.busy_ids(self.leases.values(), self.queue)
        self._drop_clients(
            client_expiry.over_limit(
                self.clients.values(), busy, identity.user, self.sessions_per_user
            )
        )
        client = Client(
            new_id("C"),
            identity.user,
            new_key(),
            identity.admin,
            time.time(),
            identity.uid,
            identity.groups,
        )
        self.clients[client.id] = client
        self.store.insert_client(client)
        return {
            "client_id": client.id,
            "client_key": client.key.hex(),
            "user": client.user,
            "admin": client.admin,
            "pseudonym": pseudonym(self.pseudonym_secret, client.user),
            "heartbeat_interval": self.heartbeat_interval,
            "queue_keepalive": self.queue_keepalive,
            "idle_timeout": self.idle_timeout,
            "version": __version__,
        }

    # -- leases --------------------------------------------------------------------------
    def request_acquire(self, req: Incoming) -> dict[str, Any] | None:
        body, client = req.msg.body, req.client
        assert client is not None
        profile = self._field(body, "profile", str, None)
        memory = self._field(body, "memory", int, None)
        wait = self._field(body, "wait", bool, True)
        timeout = self._field(body, "timeout", (int, float), None)
        ticket_id = self._field(body, "ticket", str, None) or new_id("T")
        restore = self._field(body, "restore", str, None)
        idle_timeout = self._field(body, "idle_timeout", (int, float), None)
        tag = self._field(body, "tag", str, None)
        label = self._field(body, "label", str, None)
        if memory is not None and memory <= 0:
            raise E.BadRequest(f"memory must be a positive number of bytes, got {memory}")
        if timeout is not None and timeout < 0:
            raise E.BadRequest(f"timeout must not be negative, got {timeout}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise E.BadRequest(f"idle_timeout must be positive seconds, got {idle_timeout}")
        idle = float(idle_timeout) if idle_timeout else None
        request = Request(profile, memory, idle, tag, label)

        granted = self._lease_for_ticket(client, ticket_id)
        pending = self.pending_grants.get(granted.id) if granted is not None else None
        if pending is not None:  # its executor is still preparing: answer this one when done
            pending.route, pending.reply_to = req.route, req.msg.id
            return DEFERRED
        if granted is not None:  # a re-sent acquire whose grant the client has not seen
            return {"status": "granted", "lease": self._lease_json(granted)}
        queued = next((t for t in self.queue if t.id == ticket_id), None)
        if queued is not None:
            if queued.client_id != client.id:
                raise E.BadRequest(f"ticket {ticket_id!r} belongs to another client")
            queued.route, queued.reply_to, queued.last_seen = req.route, req.msg.id, time.time()
            return self._queued_json(queued)

        self.store.require()  # a new request while state cannot be written: refused, not queued
        who = client.identity
        self.policy.check_request(who, request, [r.info for r in self.slices.values()])
        now = time.time()
        held = self._holdings(client.user, now)
        if not wait:
            self.policy.check_quota(who, held)
        if not self.policy.at_limit(who, len(held)):  # at the limit: wait for one's own slice
            usable = [r for r in self._free_slices() if self.policy.may_use(who, r.info)]
            record = P.best_fit(request, usable)
            if record is not None:
                lease = self._grant(record, client, request, ticket_id)
                self.metrics.grant_latency.observe(time.perf_counter() - req.received)
                return self._answer_grant(lease, req.route, req.msg.id, client, restore)
            if not wait:
                raise E.NoCapacity(f"no free slice fits {P.describe(request)}; all are busy")
        ticket = Ticket(
            id=ticket_id,
            client_id=client.id,
            user=client.user,
            request=request,
            enqueued=now,
            deadline=now + timeout if timeout is not None else None,
            route=req.route,
            reply_to=req.msg.id,
            last_seen=now,
            restore=restore,
        )
        self.queue.append(ticket)
        self.dirty = True
        return self._queued_json(ticket)

    def _lease_for_ticket(self, client: Client, ticket_id: str) -> Lease | None:
        for lease in self.leases.values():
            if lease.request_ticket == ticket_id and lease.owner == client.user:
                return lease
        return None

    def _free_slices(self) -> list[SliceRecord]:
        return [
            record
            for record in self.slices.values()
            if record.lease_id is None  # the cheap test first: under load most are leased
            and record.executor_id is not None
            and slice_state(record, self.executors.get(record.executor_id)) == FREE
        ]

    def _grant(self, record: SliceRecord, client: Client, request: Request, ticket: str) -> Lease:
        ex = self.executors[record.executor_id or ""]
        now = time.time()
        lease = Lease(
            id=new_id("L"),
            slice_id=record.info.id,
            owner=client.user,
            client_id=client.id,
            key=ex.tenant_key,
            created=now,
            request=request,
            last_heartbeat=now,
            last_active=now,
            request_ticket=ticket,
        )
        self.store.require()
        mark = self.store.mark()
        self.store.insert_lease(lease)
        ex.key_lease = lease.id
        self.store.save_executor(ex)
        try:
            self.store.commit_grant(mark)  # written before anyone is told (storage_guard.py)
        except E.StorageUnavailable:
            ex.key_lease = None
            raise
        upkeep.record_executor(self, ex, lease)
        record.lease_id = lease.id
        self.leases[lease.id] = lease
        self.metrics.granted.inc()
        self.dirty = True
        return lease

    def _answer_grant(
        self, lease: Lease, route: bytes, reply_to: bytes, client: Client, restore: str | None
    ) -> dict[str, Any] | None:
        """The grant reply. It waits for the executor where the executor has work to do first:
        on a multi-user broker, to become the holder (no request of theirs may reach it before);
        with ``restore``, to load the device data the named (idle-reclaimed) lease spilled
        (lukewarm start)."""
        body: dict[str, Any] = {"status": "granted", "lease": self._lease_json(lease)}
        path = self.store.take_spill(restore, client.user) if restore else None
        ex = self.executors.get(self.slices[lease.slice_id].executor_id or "")
        if ex is None or (path is None and not self.multi_user):
            if restore:
                body["restored"] = {"restored": 0, "error": f"nothing spilled for {restore}"}
            return body
        pending = PendingGrant(route, reply_to, client.key, lease.id, path, lease.owner)
        self.pending_grants[lease.id] = pending
        if self.multi_user:
            self._send_become(ex, lease)
        else:
            self.pool.request(ex, "restore", {"path": path})
        return DEFERRED

    def _owner_uid(self, lease: Lease) -> int:
        client = self.clients.get(lease.client_id)
        if client is not None and client.uid is not None:
            return client.uid
        return pwd.getpwnam(lease.owner).pw_uid

    def _send_become(self, ex: Executor, lease: Lease) -> None:
        """Ask a multi-user broker's executor to become the lease's holder (privileges.py)."""
        try:
            account = self.identity.executor_account(lease.owner, self._owner_uid(lease))
        except (KeyError, E.AuthenticationError):
            self.log.error("lease %s: its owner %r has no OS account", lease.id, lease.owner)
            self._fail_grant(ex, f"user {lease.owner!r} has no account on this node")
            if lease.id in self.leases:  # not answered by _fail_grant (no grant was pending)
                self._end_lease(lease, "slice_broken")
            return
        self.pool.request(ex, "become", account.to_json())

    def _finish_become(self, ex: Executor, reply: Message | E.MigKernelError) -> None:
        if isinstance(reply, E.MigKernelError):
            self.log.error("executor %s could not become its holder: %s", ex.id, reply)
            self.pool.kill(ex)  # never serve anyone from a process that is not its holder
            self._fail_grant(ex, f"the slice could not be prepared for you: {reply}")
            return
        pending = self.pending_grants.get(ex.key_lease or "")
        if pending is None:
            return  # a replaced executor of a held lease: ready for its holder now
        if pending.restore_path is not None:
            self.pool.request(ex, "restore", {"path": pending.restore_path})
            return
        self._answer_pending(ex, None)

    def _fail_grant(self, ex: Executor, why: str) -> None:
        pending = self.pending_grants.pop(ex.key_lease or "", None)
        if pending is None:
            return
        lease = self.leases.get(pending.lease_id)
        if lease is not None:
            self._end_lease(lease, "slice_broken")
        self._reply_error(
            pending.route, pending.reply_to, pending.key, E.SliceUnavailable(why + "; try again")
        )

    def _finish_restore(self, ex: Executor, result: dict[str, Any]) -> None:
        self._answer_pending(ex, result)

    def _answer_pending(self, ex: Executor, restored: dict[str, Any] | None) -> None:
        pending = self.pending_grants.pop(ex.key_lease or "", None)
        if pending is None:
            return
        if pending.restore_path is not None:
            shutil.rmtree(pending.restore_path, ignore_errors=True)
        lease = self.leases.get(pending.lease_id)
        if lease is None:
            return
        body: dict[str, Any] = {"status": "granted", "lease": self._lease_json(lease)}
        if restored is not None:
            body["restored"] = restored
        self._reply(pending.route, pending.reply_to, pending.key, body)

    def _start_spill(self, lease: Lease, now: float, reason: str) -> bool:
        """Idle reclaim (or a suspend): the executor first writes the lease's device data to
        the user's spill directory, then the lease ends with ``reason``; the holder's next
        acquire can restore it. False when there is no ready executor to ask."""
        ex = self.executors.get(self.slices[lease.slice_id].executor_id or "")
        if ex is None or ex.phase != "ready":
            return False
        lease.spill_deadline = now + self.spill_timeout
        lease.spill_reason = reason
        try:
            path = self._spill_path(lease)
        except (KeyError, UnsafePath, OSError) as exc:
            self.log.error("lease %s: no spill directory: %s", lease.id, exc)
            return False
        self.pool.request(ex, "spill", {"path": str(path)})
        return True

    def _finish_spill(self, ex: Executor, result: dict[str, Any] | None) -> None:
        lease = self.leases.get(ex.key_lease or "")
        if lease is None or lease.spill_deadline is None:
            return
        if result is not None and result.get("spilled"):
            self.store.set_spill(lease.id, str(self._spill_path(lease)))
        self._end_spilled(lease, result)

    def _end_spilled(self, lease: Lease, result: dict[str, Any] | None) -> None:
        """End a lease whose spill finished (``result``) or never answered (None)."""
        pending = self.pending_suspends.pop(lease.id, None)
        self._end_lease(lease, lease.spill_reason)
        if pending is not None:
            route, reply_to, key = pending
            spilled = result if result is not None else {"spilled": 0, "error": "spill timed out"}
            self._reply(route, reply_to, key, {"released": lease.id, "spilled": spilled})

    def _lease_json(self, lease: Lease) -> dict[str, Any]:
        record = self.slices[lease.slice_id]
        ex = self.executors.get(record.executor_id or "")
        return {
            "id": lease.id,
            "slice": record.public_json(),
            "executor": {
                "endpoint": ex.endpoint if ex else None,
                "pid": ex.pid if ex else None,
                "generation": lease.generation,
                "replaced": lease.replaced,  # why the last executor was replaced, if it was
            },
            "key": lease.key.hex(),
            "owner": lease.owner,
            "created": lease.created,
            "idle_timeout": self._idle_limit(lease),
            "tag": lease.request.tag,
            "request": lease.request.to_json(),
            "heartbeat_interval": self.heartbeat_interval,
        }

    def _idle_limit(self, lease: Lease) -> float:
        """The lease's idle timeout: what it asked for, never longer than the broker's (an
        operator's limit); 0 means never. A lease may ask for one where the broker has none."""
        asked = lease.request.idle_timeout
        if asked and (self.idle_timeout <= 0 or asked < self.idle_timeout):
            return asked
        return self.idle_timeout

    def _queued_json(self, ticket: Ticket) -> dict[str, Any]:
        """A queued answer: the place in the queue, and why it waits (``waiting_for``:
        ``quota`` when the user's own slices hold it back, with their notebooks named in
        ``reason``; ``slice`` when nothing that fits is free)."""
        waiting_for, reason = self._queue_reason(ticket, time.time())
        return {
            "status": "queued",
            "ticket": ticket.id,
            "position": self.queue.index(ticket) + 1,
            "queue_length": len(self.queue),
            "waiting_for": waiting_for,
            "reason": reason,
        }

    def _queue_reason(self, ticket: Ticket, now: float) -> tuple[str, str]:
        client = self.clients.get(ticket.client_id)
        who = client.identity if client is not None else Identity(ticket.user)
        reason = self.policy.quota_wait(who, self._holdings(ticket.user, now))
        if reason is not None:
            return "quota", reason
        return "slice", f"every slice that fits {P.describe(ticket.request)} is in use"

    def _holdings(self, user: str, now: float) -> list[P.Holding]:
        """The user's leases as refusals and queued answers name them (notebook, idle)."""
        return [
            P.Holding(
                lease.id,
                lease.slice_id,
                self.slices[lease.slice_id].info.profile,
                now - lease.last_active,
                lease.request.label,
                lease.request.tag,
            )
            for lease in self.leases.values()
            if lease.owner == user
        ]

    def request_cancel(self, req: Incoming) -> dict[str, Any]:
        assert req.client is not None
        ticket_id = self._field(req.msg.body, "ticket", str)
        for ticket in self.queue:
            if ticket.id == ticket_id and ticket.client_id == req.client.id:
                self.queue.remove(ticket)
                self.dirty = True
                return {"cancelled": True, "released": None}
        lease = self._lease_for_ticket(req.client, ticket_id)
        if lease is not None:  # the grant crossed the cancel: undo it
            self._end_lease(lease, "released")
            return {"cancelled": True, "released": lease.id}
        return {"cancelled": False, "released": None}

    def _owned_lease(self, req: Incoming, lease_id: str) -> Lease:
        assert req.client is not None
        lease = self.leases.get(lease_id)
        if lease is None:
            ended = self.store.ended_lease(lease_id)
            if ended is not None and (ended[0] == req.client.user or req.client.admin):
                raise E.LeaseEnded(
                    f"lease {lease_id} already ended ({ended[1]}) "
                    f"{time.time() - ended[2]:.0f} s ago",
                    reason=ended[1],
                )
            raise E.LeaseNotFound(f"no lease {lease_id!r} on this broker")
        if not self.policy.may_manage(req.client.identity, lease.owner):
            raise E.NotPermitted(f"lease {lease_id} belongs to another user")
        return lease

    def request_release(self, req: Incoming) -> dict[str, Any] | None:
        """End a lease. With ``spill`` (the holder's own lease only) it is suspended rather than
        dropped: its device data is spilled as on an idle reclaim, so an acquire with
        ``restore`` brings it back; the reply waits for the spill. Releasing a lease that already
        ended with spilled data (idle, suspended) discards that data: nobody will restore it."""
        assert req.client is not None
        lease_id = self._field(req.msg.body, "lease_id", str)
        if lease_id not in self.leases:
            path = self.store.take_spill(lease_id, req.client.user)
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
                return {"released": lease_id, "discarded": True}
        lease = self._owned_lease(req, lease_id)
        spill = self._field(req.msg.body, "spill", bool, False)
        reason = "released" if lease.owner == req.client.user else "admin"
        if spill and reason == "released":
            if lease.spill_deadline is not None:
                raise E.BadRequest(f"lease {lease.id} is already being spilled")
            if self._start_spill(lease, time.time(), "suspended"):
                self.pending_suspends[lease.id] = (req.route, req.msg.id, req.client.key)
                return DEFERRED
            self._end_lease(lease, "suspended")
            return {"released": lease.id, "spilled": {"spilled": 0, "error": "no ready executor"}}
        self._end_lease(lease, reason)
        return {"released": lease.id}

    def request_leases(self, req: Incoming) -> dict[str, Any]:
        """The caller's active leases, optionally only those with ``tag``."""
        assert req.client is not None
        tag = self._field(req.msg.body, "tag", str, None)
        return {
            "leases": [
                self._lease_json(lease)
                for lease in self.leases.values()
                if lease.owner == req.client.user and (tag is None or lease.request.tag == tag)
            ]
        }

    def request_lease(self, req: Incoming) -> dict[str, Any]:
        """A lease's details; its key and executor address only to its holder (an admin
        inspecting another user's lease sees the rest)."""
        assert req.client is not None
        lease = self._owned_lease(req, self._field(req.msg.body, "lease_id", str))
        body = self._lease_json(lease)
        if lease.owner != req.client.user:
            body["key"] = None
            body["executor"] = {**body["executor"], "endpoint": None}
        return {"lease": body, "idle_seconds": time.time() - lease.last_active}

    def request_heartbeat(self, req: Incoming) -> dict[str, Any]:
        assert req.client is not None
        ids = self._field(req.msg.body, "lease_ids", list)
        now = time.time()
        states: dict[str, Any] = {}
        for lease_id in ids[:64]:
            if not isinstance(lease_id, str):
                raise E.BadRequest("lease_ids must be strings")
            lease = self.leases.get(lease_id)
            if lease is not None and lease.owner == req.client.user:
                lease.last_heartbeat = now
                if req.peer is not None:
                    lease.holder_pid = req.peer.pid  # executor/orphan.py: whose it is
                states[lease_id] = {
                    "state": "active",
                    "idle_seconds": now - lease.last_active,
                    "generation": lease.generation,
                    "replaced": lease.replaced,
                }
                continue
            ended = self.store.ended_lease(lease_id)
            if ended is not None and ended[0] == req.client.user:
                states[lease_id] = {"state": "ended", "reason": ended[1]}
            else:
                states[lease_id] = {"state": "unknown"}
        return {"leases": states}

    def _end_lease(self, lease: Lease, reason: str) -> None:
        self.leases.pop(lease.id, None)
        pending = self.pending_suspends.pop(lease.id, None)
        if pending is not None:  # ended another way while suspending: its data is not spilled
            route, reply_to, key = pending
            spilled = {"spilled": 0, "error": f"the lease ended first ({reason})"}
            self._reply(route, reply_to, key, {"released": lease.id, "spilled": spilled})
        self.store.end_lease(lease.id, reason)
        if reason == "released":
            self.metrics.released.inc()
        else:
            self.metrics.reclaimed.labels(reason=reason).inc()
        self.log.info(
            "lease %s of %s on %s ended: %s", lease.id, lease.owner, lease.slice_id, reason
        )
        record = self.slices.get(lease.slice_id)
        if record is not None and record.lease_id == lease.id:
            record.lease_id = None
            ex = self.executors.get(record.executor_id or "")
            if ex is not None and ex.phase == "ready" and not self.stopping:
                self._retire_or_rekey(ex)
        self.dirty = True

    def _retire_or_rekey(self, ex: Executor) -> None:
        """After a lease: a single-user broker asks the executor whether it is still pristine
        and keeps it if so (rekey); a multi-user broker never asks. Its tenant's code may have
        run in that process, may have rewritten what the executor would answer, and may still
        run there as the tenant's uid: whatever it says, it goes (stopped, killed after the
        grace), and a fresh one is warmed."""
        if self.multi_user:
            self.pool.stop(ex)
        else:
            self.pool.rekey(ex)

    # -- views --------------------------------------------------------------------------
    def request_status(self, req: Incoming) -> dict[str, Any]:
        assert req.client is not None
        return self.status_for(Identity(req.client.user, req.client.admin))

    def status_for(self, viewer: Identity | None) -> dict[str, Any]:
        """design.md's status JSON; the viewer sees its own leases in full, others anonymized
        (``viewer=None``: everyone anonymized, as on the watch stream)."""
        now = time.time()
        slices = []
        for record in self.slices.values():
            info = record.info
            ex = self.executors.get(record.executor_id or "")
            lease = self.leases.get(record.lease_id or "")
            mine = lease is not None and viewer is not None and lease.owner == viewer.user
            full = lease is not None and viewer is not None and (mine or viewer.admin)
            used = self.inventory.memory_used(info)
            if used is None:
                used = ex.memory_used if ex is not None else 0
            entry: dict[str, Any] = {
                "id": info.id,
                "uuid": info.uuid,
                "gpu": info.gpu_index,
                "profile": info.profile,
                "isolation": info.isolation.value,
                "memory_total": info.memory_total,
                "memory_used": used,
                "busy": round(ex.busy, 3) if ex is not None and ex.busy is not None else None,
                "state": slice_state(record, ex),
                "holder": None,
                "mine": mine,
                "sms": info.sms,
                "placement": (
                    {"start": info.placement_start, "size": info.placement_size}
                    if info.placement_start is not None
                    else None
                ),
                "lease": None,
                "broken_reason": record.broken,
            }
            if lease is not None:
                entry["holder"] = (
                    lease.owner if full else pseudonym(self.pseudonym_secret, lease.owner)
                )
                entry["idle_seconds"] = round(now - lease.last_active, 3)
                if full:
                    entry["lease"] = {
                        "id": lease.id,
                        "created": lease.created,
                        "idle_timeout": (limit := self._idle_limit(lease)),
                        "expires_in": (
                            max(0.0, limit - (now - lease.last_active)) if limit > 0 else None
                        ),
                        "executor_pid": ex.pid if ex else None,
                        "tag": lease.request.tag,
                    }
            slices.append(entry)
        queue = []
        for position, ticket in enumerate(self.queue, 1):
            mine = viewer is not None and ticket.user == viewer.user
            full = viewer is not None and (mine or viewer.admin)
            queue.append(
                {
                    "position": position,
                    "profile": ticket.request.profile,
                    "memory": ticket.request.memory,
                    "holder": ticket.user
                    if full
                    else pseudonym(self.pseudonym_secret, ticket.user),
                    "mine": mine,
                    "tag": ticket.request.tag if full else None,
                    "waiting_seconds": round(now - ticket.enqueued, 3),
                    # why it waits, to its owner (names their notebooks): quota | slice
                    "waiting_for": self._queue_reason(ticket, now)[0] if full else None,
                }
            )
        return {
            "node": socket.gethostname(),
            "backend": self.inventory.backend,
            "gpus": [gpu.to_json() for gpu in self.inventory.gpus()],
            "slices": slices,
            "queue": queue,
        }

    def request_watch(self, req: Incoming) -> dict[str, Any]:
        assert req.client is not None
        return {
            "endpoint": self.watch_endpoint,
            "key": self.watch_key.hex(),
            "pseudonym": pseudonym(self.pseudonym_secret, req.client.user),
            "seq": self.seq,
        }

    def request_metrics(self, req: Incoming) -> dict[str, Any]:
        self._update_gauges()
        return {"text": self.metrics.text()}

    def _update_gauges(self) -> None:
        counts: dict[str, int] = {}
        for record in self.slices.values():
            state = slice_state(record, self.executors.get(record.executor_id or ""))
            counts[state] = counts.get(state, 0) + 1
        self.metrics.set_slice_counts(counts, len(self.queue))

    def _maybe_publish(self) -> None:
        now = time.time()
        if not self.dirty or not self._due("publish", self.publish_interval, now):
            return
        self.dirty = False
        self.seq += 1
        self._update_gauges()
        body = self.status_for(None)
        body["seq"] = self.seq
        self.pub.send_multipart([b"state", *encode("state", body, self.watch_key, sender="broker")])

    # -- admin --------------------------------------------------------------------------
    def _slice(self, slice_id: Any) -> SliceRecord:
        record = self.slices.get(slice_id) if isinstance(slice_id, str) else None
        if record is None:
            raise E.NoSuchSlice(f"no slice {slice_id!r}; slices: {', '.join(self.slices)}")
        return record

    def request_drain(self, req: Incoming) -> dict[str, Any]:
        self._require_admin(req)
        record = self._slice(req.msg.body.get("slice_id"))
        record.drained = True
        self.store.save_slice(record)
        ex = self.executors.get(record.executor_id or "")
        if ex is not None and record.lease_id is None:
            self.pool.stop(ex)
        self.dirty = True
        return {"slice_id": record.info.id, "state": "draining", "lease": record.lease_id}

    def request_undrain(self, req: Incoming) -> dict[str, Any]:
        self._require_admin(req)
        record = self._slice(req.msg.body.get("slice_id"))
        record.drained = False
        record.broken = None
        record.failures = 0
        self.store.save_slice(record)
        self._ensure_executor(record)
        self.dirty = True
        return {"slice_id": record.info.id}

    def request_apply_layout(self, req: Incoming) -> dict[str, Any]:
        self._require_admin(req)
        gpu = self._field(req.msg.body, "gpu", int)
        layout = self._field(req.msg.body, "layout", str)
        on_gpu = [r for r in self.slices.values() if r.info.gpu_index == gpu]
        busy = [r for r in on_gpu if r.lease_id is not None]
        if busy:
            raise E.LayoutRefused(
                f"GPU {gpu} is in use: leases {', '.join(r.lease_id or '' for r in busy)} hold "
                f"slices on it; drain and wait for them to end",
                reason="in_use",
            )
        self._stop_executors_now([r for r in on_gpu])
        try:
            infos = self.inventory.apply_layout(gpu, layout)
        except ApplyRefused as exc:
            for record in on_gpu:
                self._ensure_executor(record)
            raise E.LayoutRefused(str(exc), reason=exc.code) from None
        self._reconcile(infos)
        for record in self.slices.values():
            self._ensure_executor(record)
        self._drain_queue()
        return {"slices": [i.to_json() for i in infos if i.gpu_index == gpu]}

    def _stop_executors_now(self, records: list[SliceRecord]) -> None:
        executors = [
            self.executors[r.executor_id] for r in records if r.executor_id in self.executors
        ]
        for ex in executors:
            self.pool.stop(ex)
        self._flush()
        deadline = time.time() + 3.0
        while time.time() < deadline and any(self.pool.alive(ex) for ex in executors):
            time.sleep(0.01)
        for ex in executors:
            self.pool.kill(ex)
            self._forget_executor(ex)

    # ================================================================== executors
    def _register_executor(self, ex: Executor, record: SliceRecord) -> None:
        self.executors[ex.id] = ex
        record.executor_id = ex.id
        assert ex.socket is not None
        self.poller.register(ex.socket, zmq.POLLIN)
        self.store.save_executor(ex)
        upkeep.record_executor(self, ex, self.leases.get(ex.key_lease or ""))

    def _forget_executor(self, ex: Executor) -> None:
        if ex.socket is not None:
            self.poller.unregister(ex.socket)
        self.pool.forget(ex)
        self.executors.pop(ex.id, None)
        self.store.delete_executor(ex.id)
        if not self.pool.alive(ex):
            self.registry.forget(ex.id)
        record = self.slices.get(ex.slice_id)
        if record is not None and record.executor_id == ex.id:
            record.executor_id = None
        self.dirty = True

    def _ensure_executor(self, record: SliceRecord) -> None:
        if self.stopping or record.drained or record.broken or record.executor_id is not None:
            return
        lease = self.leases.get(record.lease_id or "")
        if lease is not None:
            key, key_lease = lease.key, lease.id
        else:
            key, key_lease = new_key(), None
        try:
            ex = self.pool.spawn(record.info, key, key_lease)
        except OSError as exc:
            record.broken = f"cannot start an executor: {exc}"
            self.store.save_slice(record)
            return
        self.metrics.executor_starts.inc()
        self._register_executor(ex, record)
        self.dirty = True

    def _on_executor_reply(
        self, kind: str, ex: Executor, reply: Message | E.MigKernelError
    ) -> None:
        if kind == "restore":
            error = {"restored": 0, "error": str(reply)}
            self._finish_restore(ex, error if isinstance(reply, E.MigKernelError) else reply.body)
            return
        if kind == "become":
            self._finish_become(ex, reply)
            return
        if kind == "spill":
            self._finish_spill(ex, None if isinstance(reply, E.MigKernelError) else reply.body)
            return
        if isinstance(reply, E.MigKernelError):
            self.log.error("executor %s answered %s with an error: %s", ex.id, kind, reply)
            if ex.phase in ("starting", "rekeying") or kind == "refused":
                self.pool.kill(ex)  # it cannot be trusted with a tenant: replace it
            return
        record = self.slices.get(ex.slice_id)
        if record is None:
            return
        if kind == "ready":
            ex.phase = "ready"
            ex.warm_seconds = reply.body.get("warm_seconds")
            record.failures = 0
            lease = self.leases.get(record.lease_id or "")
            if (
                self.multi_user
                and lease is not None
                and ex.key_lease == lease.id
                and reply.body.get("holder") is None
            ):
                self._send_become(ex, lease)  # a replacement for a held lease: its holder's
            if ex.key_lease is not None and ex.key_lease not in self.leases:
                self._retire_or_rekey(ex)  # its key belongs to a lease that ended meanwhile
            elif record.lease_id is None and self._unwanted(ex, record):
                self.pool.stop(ex)
            self.dirty = True
            self._drain_queue()
        elif kind == "rekey":
            if reply.body.get("pristine") and ex.pending_key is not None:
                ex.tenant_key, ex.key_lease, ex.pending_key = ex.pending_key, None, None
                ex.phase = "ready"
                self.store.save_executor(ex)
                if self._unwanted(ex, record):
                    self.pool.stop(ex)
                self._drain_queue()
            else:
                ex.phase = "stopping"  # it served a tenant and exits by itself
                ex.deadline = time.time() + 3.0
            self.dirty = True
        elif kind == "stats":
            before = (ex.memory_used, ex.busy)
            ex.memory_used = int(reply.body.get("memory_used") or 0)
            self._note_busy(ex, reply.body)
            if (ex.memory_used, ex.busy) != before:
                self.dirty = True  # displays show memory and busy share: publish the change
            lease = self.leases.get(ex.key_lease or "")
            if lease is not None:
                lease.last_active = max(
                    lease.last_active, float(reply.body.get("last_active") or 0)
                )

    def _unwanted(self, ex: Executor, record: SliceRecord) -> bool:
        """Whether a free executor should stop: its slice is drained, or it speaks the other
        transport (re-adopted by a broker restarted with another ``executor_transport``; the
        fresh one that replaces it speaks the configured one)."""
        return record.drained or transport_of(ex.endpoint) != self.executor_transport

    @staticmethod
    def _note_busy(ex: Executor, stats: dict[str, Any]) -> None:
        """Busy share between two stats answers, from the executor's own clock and total."""
        total, at = stats.get("busy_seconds"), stats.get("at")
        if not isinstance(total, (int, float)) or not isinstance(at, (int, float)):
            return
        if ex.busy_seconds is not None and at > ex.stats_at:
            ex.busy = min(1.0, max(0.0, (total - ex.busy_seconds) / (at - ex.stats_at)))
        ex.busy_seconds, ex.stats_at = float(total), float(at)

    def _check_executors(self, now: float) -> None:
        for ex in list(self.executors.values()):
            if not self.pool.alive(ex):
                self._executor_gone(ex, self.pool.exit_description(ex))
            elif now > ex.deadline and ex.phase != "ready":
                self.log.warning("executor %s (%s) timed out; killing it", ex.id, ex.phase)
                ex.deadline = float("inf")  # killed once; _executor_gone follows
                self.pool.kill(ex)

    def _executor_gone(self, ex: Executor, why: str) -> None:
        why = ex.gone_reason or why  # the broker's own reason when it killed a hung one
        expected = ex.phase == "stopping"
        never_ready = ex.phase == "starting"
        self._forget_executor(ex)
        record = self.slices.get(ex.slice_id)
        if record is None:
            return
        if not expected:
            self.log.warning("executor %s on %s: %s", ex.id, record.info.id, why)
        if never_ready and not ex.adopted:
            record.failures += 1
            if record.failures >= self.max_executor_failures:
                tail = self.pool.log_tail(record.info.id)
                record.broken = f"executor failed to start {record.failures} times: {why}. {tail}"
                self.store.save_slice(record)
                lease = self.leases.get(record.lease_id or "")
                if lease is not None:
                    self._end_lease(lease, "slice_broken")
                return
        lease = self.leases.get(record.lease_id or "")
        if lease is not None:
            lease.generation += 1
            lease.replaced = why if ex.gone_reason else f"the executor (pid {ex.pid}) {why}"
            self.store.update_lease_generation(lease)
        self._ensure_executor(record)

    # ================================================================== reclaim & queue
    def _cancel_queue(self) -> None:
        """Answer every waiting acquire that the broker is shutting down."""
        for ticket in self.queue:
            self._reply_error(
                ticket.route,
                ticket.reply_to,
                self._client_key(ticket.client_id),
                E.AcquireCancelled("the broker is shutting down"),
            )
        self.queue.clear()

    def _check_leases(self, now: float) -> None:
        lost_after = self.heartbeat_interval * self.heartbeat_misses
        for lease in list(self.leases.values()):
            if lease.spill_deadline is not None:
                if now > lease.spill_deadline:
                    self._end_spilled(lease, None)  # the spill never answered: data is lost
            elif now - lease.last_heartbeat > lost_after:
                self._end_lease(lease, "holder_lost")
            elif (
                (limit := self._idle_limit(lease)) > 0
                and now - lease.last_active > limit
                and not self._start_spill(lease, now, "idle")
            ):
                self._end_lease(lease, "idle")

    def _check_queue(self, now: float) -> None:
        dropped_after = self.queue_keepalive * self.queue_keepalive_misses
        for ticket in list(self.queue):
            if ticket.deadline is not None and now > ticket.deadline:
                self.queue.remove(ticket)
                self._reply_error(
                    ticket.route,
                    ticket.reply_to,
                    self._client_key(ticket.client_id),
                    E.AcquireTimeout(
                        f"no slice for {P.describe(ticket.request)} within "
                        f"{ticket.deadline - ticket.enqueued:g} s"
                    ),
                )
                self.dirty = True
            elif now - ticket.last_seen > dropped_after:
                self.queue.remove(ticket)  # the waiter is gone; nobody to answer
                self.dirty = True

    def _drain_queue(self) -> None:
        """Grant queued requests as the policy orders them (policy.queue_grants)."""
        free = self._free_slices() if self.queue and self.store.healthy else []
        if not free:
            return  # (while state cannot be written, waiters wait: grants need a commit)
        held = Counter(lease.owner for lease in self.leases.values())
        unknown = Identity("")

        def who(ticket: Ticket) -> Identity:
            client = self.clients.get(ticket.client_id)
            return client.identity if client is not None else unknown

        grants = P.queue_grants(
            self.queue,
            free,
            held,
            lambda ticket: self.policy.limit_for(who(ticket)),
            lambda ticket, info: self.policy.may_use(who(ticket), info),
        )
        for ticket, record in grants:
            self.queue.remove(ticket)
            client = self.clients.get(ticket.client_id)
            if client is None:
                continue
            try:
                lease = self._grant(record, client, ticket.request, ticket.id)
            except E.StorageUnavailable:
                self.queue.insert(0, ticket)  # waits on: granted once state can be written
                return
            self.metrics.grant_latency.observe(time.time() - ticket.enqueued)
            body = self._answer_grant(lease, ticket.route, ticket.reply_to, client, ticket.restore)
            if body is not DEFERRED:
                self._reply(ticket.route, ticket.reply_to, client.key, body)
