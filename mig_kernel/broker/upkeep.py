"""The broker's housekeeping after faults, kept out of server.py's request logic.

Each function takes the broker and does one job the reliability promises (docs/reliability.md)
need: the executor registry kept current, executors the database does not know stopped before
their slices are granted, the data of an executor that left orphaned handed back to its
owner, the sweeps, a removed runtime dir recreated, and a stop while state cannot be written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from ..procs import proc_start_ticks
from ..wire import errors as E
from ..wire.connection import bind_private
from ..wire.paths import UnsafePath, secure_dir
from .registry import Entry, recover
from .state import Executor, Lease
from .sweeper import segment_dirs, sweep_segments, sweep_sockets

if TYPE_CHECKING:
    from .server import Broker

log = logging.getLogger("mig_kernel.broker")


# -- the executor registry -----------------------------------------------------------------
def record_executor(broker: Broker, ex: Executor, lease: Lease | None) -> None:
    broker.registry.record(
        Entry(
            id=ex.id,
            slice_id=ex.slice_id,
            pid=ex.pid,
            start_ticks=ex.start_ticks,
            endpoint=ex.endpoint,
            control_key=ex.control_key.hex(),
            lease=lease.id if lease is not None else None,
            owner=lease.owner if lease is not None else None,
        )
    )


def stop_strays(broker: Broker) -> None:
    """At start, after the database's executors were re-adopted: stop every other executor of
    this broker (registry.py), saving held leases' data first."""
    known = {(ex.pid, ex.start_ticks) for ex in broker.executors.values()}

    def spill_path(entry: Entry) -> Path | None:
        if entry.lease is None:
            return None
        try:
            account = None
            if broker.multi_user and entry.owner:
                uid = pwd.getpwnam(entry.owner).pw_uid
                account = broker.identity.executor_account(entry.owner, uid)
            return broker.places.spill_path(entry.lease, account)
        except (KeyError, UnsafePath, OSError, E.MigKernelError) as exc:
            log.error("no spill directory for lease %s: %s", entry.lease, exc)
            return None

    def record_lost(entry: Entry, spilled: str | None) -> None:
        assert entry.lease is not None
        lease = broker.leases.get(entry.lease)
        if lease is not None:
            broker._end_lease(lease, "state_lost")
            if spilled is not None:
                broker.store.set_spill(lease.id, spilled)
        elif broker.store.ended_lease(entry.lease) is None:
            owner = entry.owner or ""
            broker.store.insert_ended_lease(
                entry.lease, entry.slice_id, owner, "state_lost", spilled
            )

    stopped = recover(broker.registry, known, spill_path, record_lost, broker.context)
    if stopped:
        broker.dirty = True


def left_orphaned(broker: Broker, lease: Lease) -> bool:
    """At start, for a lease whose executor is gone: did it leave by itself after saving the
    lease's data (executor/orphan.py)? Then the lease ends as ``orphaned`` with that spill,
    and its owner's next call restores it."""
    try:
        path = broker._spill_path(lease)
    except (KeyError, UnsafePath, OSError, E.MigKernelError):
        return False
    if not (path / "manifest.json").exists():
        return False
    broker._end_lease(lease, "orphaned")
    broker.store.set_spill(lease.id, str(path))
    log.warning("lease %s: its executor left without broker and holder; data kept", lease.id)
    return True


def holder_of(broker: Broker, ex: Executor) -> dict[str, Any] | None:
    """The body of a stats request: which process holds the executor's lease."""
    lease = broker.leases.get(ex.key_lease or "")
    if lease is None or lease.holder_pid is None:
        return None
    return {"holder_pid": lease.holder_pid, "holder_ticks": proc_start_ticks(lease.holder_pid)}


# -- leftovers -----------------------------------------------------------------------------
def sweep(broker: Broker) -> None:
    sweep_segments(segment_dirs())
    sweep_sockets(broker.runtime_path, broker.executors)


def restore_runtime_dir(broker: Broker) -> None:
    """The runtime dir (or the broker's sockets in it) was removed: recreate it with its mode,
    bind the broker's sockets again and rewrite the connection file. Free executors whose
    socket file went with it are replaced (no new holder could connect to them); leased ones
    keep their holders' connections."""
    mode = 0o755 if broker.multi_user else 0o700
    try:
        secure_dir(broker.runtime_path, mode)
    except (UnsafePath, OSError) as exc:
        log.error("runtime dir %s is gone and cannot be made again: %s", broker.runtime_path, exc)
        return
    socket_mode = 0o666 if broker.multi_user else 0o600
    for sock, endpoint in ((broker.router, broker.endpoint), (broker.pub, broker.watch_endpoint)):
        with contextlib.suppress(zmq.ZMQError):
            sock.unbind(endpoint)
        bind_private(sock, endpoint, socket_mode)
    broker.places.write_connection(broker.connection_info)
    for ex in list(broker.executors.values()):
        path = ex.endpoint.removeprefix("ipc://")
        if ex.key_lease is None and path != ex.endpoint and not os.path.exists(path):
            broker.pool.stop(ex)  # unreachable for a new holder: a fresh one binds anew
    for record in broker.slices.values():
        if record.broken:  # executors that could not bind meanwhile: a new dir is a retry
            record.broken, record.failures = None, 0
            broker.store.save_slice(record)
        broker._ensure_executor(record)
    broker.dirty = True
    log.warning("runtime dir %s was removed: made again, sockets bound", broker.runtime_path)


# -- a stop while state cannot be written --------------------------------------------------
def shutdown_degraded(broker: Broker) -> None:
    """Stop without ending leases: what the broker would write cannot be written, so the
    leases and their executors stay as the database last recorded them, for the next broker
    to re-adopt (as after a SIGKILL; executors leave by themselves after ``orphan_grace``).
    Only executors that hold nothing are stopped. The connection file and sockets go."""
    log.error(
        "stopping while state storage is unavailable (%s): leases and their executors are "
        "left running for the next broker",
        broker.store.reason,
    )
    broker._cancel_queue()
    idle = [ex for ex in broker.executors.values() if ex.key_lease is None]
    for ex in idle:
        broker.pool.stop(ex)
    broker._flush()
    deadline = time.time() + 3.0
    while time.time() < deadline and any(broker.pool.alive(ex) for ex in idle):
        time.sleep(0.02)
    for ex in list(broker.executors.values()):
        if ex in idle:
            broker.pool.kill(ex)
            broker.registry.forget(ex.id)
        if ex.socket is not None:
            broker.poller.unregister(ex.socket)
        if ex in idle:
            broker.pool.forget(ex)
        elif ex.socket is not None:
            ex.socket.close(linger=0)
            ex.socket = None
    broker.store.close()
    broker._close_endpoints()
