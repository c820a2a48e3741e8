"""The broker's records: slices, executors, leases, clients and queued requests.

Slice state is derived, never stored (``slice_state``), so it cannot disagree with the records
it is derived from.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from ..slices.model import SliceInfo
from .identity import Identity

FREE, WARMING, LEASED, DRAINING, BROKEN = "free", "warming", "leased", "draining", "broken"


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(6).hex()}"


@dataclass
class Request:
    """What a client asked for: a profile, or a minimum of memory, or anything; and, for the
    lease it gets, a shorter idle timeout, a tag (who in the user's processes holds it, for
    example ``kernel:<kernel id>``, so a restarted kernel or its provisioner finds it again) and
    a label (what the user calls the holder: the kernel's notebook path), which refusals and
    queued answers name, shown to the owner only."""

    profile: str | None = None
    memory: int | None = None
    idle_timeout: float | None = None
    tag: str | None = None
    label: str | None = None

    def fits(self, info: SliceInfo) -> bool:
        if self.profile is not None and info.profile != self.profile:
            return False
        return self.memory is None or info.memory_total >= self.memory

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "memory": self.memory,
            "idle_timeout": self.idle_timeout,
            "tag": self.tag,
            "label": self.label,
        }


@dataclass
class Client:
    """A client session (one ``hello``): who it is, and the key that signs its requests."""

    id: str
    user: str
    key: bytes
    admin: bool
    created: float
    uid: int | None = None  # every request of the session must come from this uid
    groups: tuple[str, ...] = ()
    last_seen: float = field(default_factory=time.time)  # its last request (client_expiry.py)

    @property
    def identity(self) -> Identity:
        return Identity(self.user, self.admin, self.uid, self.groups)


@dataclass
class Lease:
    id: str
    slice_id: str
    owner: str
    client_id: str
    key: bytes
    created: float
    request: Request
    last_heartbeat: float
    last_active: float
    generation: int = 0  # executors the lease has had (a replaced executor bumps it)
    request_ticket: str = ""  # the acquire ticket it answered: a re-sent acquire finds it
    spill_deadline: float | None = None  # set while its executor spills it (idle or suspend)
    spill_reason: str = "idle"  # how the lease ends once the spill is done
    replaced: str | None = None  # why its last executor was replaced (told to the holder)
    holder_pid: int | None = None  # the process its heartbeats come from (ipc peer)


@dataclass
class Executor:
    """A live executor process and the broker's DEALER to it."""

    id: str
    slice_id: str
    endpoint: str
    control_key: bytes
    tenant_key: bytes
    key_lease: str | None  # the lease the tenant key was issued to, None while unissued
    pid: int = 0
    start_ticks: int | None = None
    popen: subprocess.Popen[bytes] | None = None  # None when adopted after a broker restart
    socket: zmq.Socket | None = None
    phase: str = "starting"  # starting | ready | rekeying | stopping
    deadline: float = 0.0
    started_at: float = field(default_factory=time.time)
    warm_seconds: float | None = None
    pending_key: bytes | None = None
    memory_used: int = 0
    adopted: bool = False
    busy: float | None = None  # share of the last stats interval spent running calls
    busy_seconds: float | None = None  # the executor's running total at its last stats answer
    stats_at: float = 0.0  # the executor's monotonic clock at that answer
    stats_outstanding: bool = False  # a stats request is unanswered (at most one is sent)
    awaiting_since: float | None = None  # since when a request waits for any answer
    gone_reason: str | None = None  # why the broker killed it (it stopped answering)


@dataclass
class SliceRecord:
    info: SliceInfo
    drained: bool = False
    broken: str | None = None  # why, when the slice cannot host an executor
    failures: int = 0
    executor_id: str | None = None
    lease_id: str | None = None
    _public: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def public_json(self) -> dict[str, Any]:
        """The slice as clients see it (no executor environment); cached, it is on every grant."""
        if self._public is None:
            public = self.info.to_json()
            public.pop("env", None)
            self._public = public
        return self._public


@dataclass
class Ticket:
    """A queued acquire: answered on ``route`` (the client's latest ZeroMQ identity)."""

    id: str
    client_id: str
    user: str
    request: Request
    enqueued: float
    deadline: float | None
    route: bytes
    reply_to: bytes
    last_seen: float
    restore: str | None = None  # spill directory of an idle-reclaimed lease to bring back


def slice_state(record: SliceRecord, executor: Executor | None) -> str:
    if record.broken:
        return BROKEN
    if record.drained:
        return DRAINING
    if record.lease_id is not None:
        return LEASED
    if executor is not None and executor.phase == "ready" and executor.key_lease is None:
        return FREE
    return WARMING
