"""Which executor processes belong to this broker, whatever its database says.

The state database is the broker's memory of its executors, and it can be lost: a corrupt or
truncated file is moved aside, a lost WAL forgets the last changes. Executors outlive their
broker (they hold tenants' device data), so a broker that started from such a database would
find slices it thinks free while old executors still compute on them: two tenants on one slice.

Two sources independent of the database name this broker's executors:

- the **registry**: one 0600 JSON file per executor in ``<state_dir>/executors/`` (a 0700
  directory), written when the executor starts and when its key is handed to a lease, removed
  when it is gone; it holds what is needed to talk to it (endpoint, control key) and whose
  data it holds (lease, owner);
- the **process table**: every executor runs as ``python -m mig_kernel.executor --broker-tag
  <tag>``, the tag derived from the state dir, so even an executor whose registry file was
  never written (a full disk) is found by its command line, and named for good by its pid and
  start time (procs.py).

At start, before any slice is granted, the broker compares both with what its database
re-adopted. Every other live executor is stopped: one that held a lease first spills that
lease's device data, and the lease is recorded as ended (``state_lost``) with the spill, so its
holder's next call restores it (``recover``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq

from ..procs import proc_start_ticks
from ..wire.executor_spec import CONTROL_SENDER
from ..wire.messages import decode, encode
from ..wire.paths import private_dir

log = logging.getLogger("mig_kernel.broker")
EXECUTOR_MODULE = "mig_kernel.executor"
TAG_OPTION = "--broker-tag"


def broker_tag(state_path: Path) -> str:
    """The tag on this broker's executors' command lines (16 hex of the state dir's hash)."""
    return hashlib.sha256(str(state_path).encode()).hexdigest()[:16]


@dataclass
class Entry:
    """What the registry keeps of one executor."""

    id: str
    slice_id: str
    pid: int
    start_ticks: int | None
    endpoint: str
    control_key: str  # hex
    lease: str | None = None  # the lease its tenant key was handed to
    owner: str | None = None  # that lease's owner

    @property
    def alive(self) -> bool:
        ticks = proc_start_ticks(self.pid)
        return ticks is not None and ticks == self.start_ticks


class ExecutorRegistry:
    def __init__(self, state_path: Path) -> None:
        self.directory = state_path / "executors"
        self.tag = broker_tag(state_path)
        try:
            private_dir(self.directory)
        except OSError as exc:  # a full disk: the process table still names the executors
            log.error("executor registry %s unavailable: %s", self.directory, exc)

    def _path(self, executor_id: str) -> Path:
        return self.directory / f"{executor_id}.json"

    def record(self, entry: Entry) -> None:
        """Write (or rewrite) an executor's entry; a full disk is logged, not fatal: the
        process table still names the executor."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=".E-", dir=self.directory)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(asdict(entry), f)
                os.replace(tmp, self._path(entry.id))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.error("executor registry: cannot record %s: %s", entry.id, exc)

    def forget(self, executor_id: str) -> None:
        with contextlib.suppress(OSError):
            self._path(executor_id).unlink()

    def entries(self) -> list[Entry]:
        found: list[Entry] = []
        if not self.directory.is_dir():
            return found
        for path in self.directory.glob("E-*.json"):
            try:
                found.append(Entry(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                log.warning("executor registry: unreadable entry %s removed", path.name)
                with contextlib.suppress(OSError):
                    path.unlink()
        return found

    def running(self) -> Iterator[tuple[int, int]]:
        """(pid, start ticks) of every live process started as one of this broker's
        executors, from the process table."""
        marker = f"{EXECUTOR_MODULE}\0{TAG_OPTION}\0{self.tag}".encode()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if marker in cmdline:
                ticks = proc_start_ticks(int(name))
                if ticks is not None:
                    yield int(name), ticks


def recover(
    registry: ExecutorRegistry,
    known: set[tuple[int, int | None]],
    spill_path: Callable[[Entry], Path | None],
    record_lost_lease: Callable[[Entry, str | None], None],
    context: zmq.Context,
    spill_timeout: float = 30.0,
) -> int:
    """Stop every live executor of this broker that is not in ``known`` (pid, start ticks),
    spilling the device data of those that held a lease first; returns how many were
    stopped. Called at start, before the first grant."""
    entries = {(e.pid, e.start_ticks): e for e in registry.entries()}
    for key, entry in list(entries.items()):
        if key in known or not entry.alive:
            if key not in known:
                registry.forget(entry.id)
            entries.pop(key)
    strays = {key: entries.get(key) for key in registry.running() if key not in known}
    strays.update(entries)
    for (pid, ticks), entry in strays.items():
        spilled = None
        if entry is not None and entry.lease is not None:
            spilled = _spill(entry, spill_path(entry), context, spill_timeout)
        if entry is not None and entry.lease is not None:
            record_lost_lease(entry, spilled)
        _stop(pid, ticks, entry, context)
        what = f"lease {entry.lease}'s device data " if entry and entry.lease else ""
        log.error(
            "executor pid %d was running but unknown to the state database: stopped before "
            "its slice is granted again%s",
            pid,
            f" ({what}{'saved' if spilled else 'lost'})" if what else "",
        )
        if entry is not None:
            registry.forget(entry.id)
    return len(strays)


def _ask(
    entry: Entry, context: zmq.Context, msg_type: str, body: dict[str, Any], timeout: float
) -> dict[str, Any] | None:
    """One control request to an executor and its reply body (None: no answer, or an error)."""
    key = bytes.fromhex(entry.control_key)
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
    try:
        sock.connect(entry.endpoint)
        msg_id = os.urandom(16)
        sock.send_multipart(encode(msg_type, body, key, sender=CONTROL_SENDER, msg_id=msg_id))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            try:
                msg = decode(sock.recv_multipart(), lambda _h: key, None)
            except Exception:  # a refusal or garbage: this executor will not answer us
                return None
            if msg.re == msg_id:
                return None if msg.type == "error" else msg.body
        return None
    finally:
        sock.close(linger=0)


def _spill(entry: Entry, path: Path | None, context: zmq.Context, timeout: float) -> str | None:
    if path is None:
        return None
    reply = _ask(entry, context, "spill", {"path": str(path)}, timeout)
    return str(path) if reply is not None and reply.get("spilled") is not None else None


def _stop(pid: int, ticks: int, entry: Entry | None, context: zmq.Context) -> None:
    """Shut it down (politely where we hold its key), SIGKILL after 3 s; returns once gone."""
    if entry is not None:
        _ask(entry, context, "shutdown", {}, 1.0)
    deadline = time.monotonic() + 3.0
    while proc_start_ticks(pid) == ticks and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc_start_ticks(pid) == ticks:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while proc_start_ticks(pid) == ticks and time.monotonic() < deadline:
        time.sleep(0.02)
