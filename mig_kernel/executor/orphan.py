"""When an executor has outlived both its broker and its lease holder, it exits.

Executors run in their own session so that a broker crash does not take tenants' device data
with it, and a restarted broker re-adopts them. A broker that never comes back, though, would
leave them holding a CUDA context (about 0.5 GiB of device and host memory each) for good. So
an executor watches two things:

- its **broker**: the process named in its spec (pid and start time, procs.py), or the one a
  later ``ready`` names (a restarted broker re-adopting it); any control request also counts;
- its **holder**: the process the broker names in its ``stats`` requests (the holder's
  heartbeat connection); while the broker has named none, tenant requests count.

Once neither has been seen for ``orphan_grace`` seconds the executor exits: a held lease's data
is spilled first (``<spill_root>/<lease>``, or ``<spill_root>/<holder>/<lease>`` for an executor
that became its holder), where a broker that comes back finds it and ends the lease with the
spill, so its owner can still restore it.
"""

from __future__ import annotations

import time
from typing import Any

from ..procs import proc_start_ticks
from ..wire.executor_spec import ExecutorSpec

CHECK_EVERY = 1.0  # seconds between two looks at /proc


class OrphanWatch:
    def __init__(self, spec: ExecutorSpec) -> None:
        self.grace = spec.orphan_grace
        self.broker = _process(spec.broker_pid, spec.broker_ticks)
        self.holder: tuple[int, int | None] | None = None
        now = time.monotonic()
        self.broker_seen = now
        self.holder_seen = now
        self.next_check = now

    def note_control(self, msg_type: str, body: dict[str, Any]) -> None:
        """A control request arrived: the broker is there; it may name itself or the holder."""
        self.broker_seen = time.monotonic()
        if msg_type == "ready" and body.get("broker_pid") is not None:
            self.broker = _process(body.get("broker_pid"), body.get("broker_ticks"))
        elif msg_type == "stats" and body.get("holder_pid") is not None:
            self.holder = _process(body.get("holder_pid"), body.get("holder_ticks"))

    def note_tenant(self) -> None:
        self.holder_seen = time.monotonic()

    def orphaned(self) -> bool:
        """Checked from the request loop: True once broker and holder have both been gone for
        the grace period."""
        now = time.monotonic()
        if self.grace <= 0 or now < self.next_check:
            return False
        self.next_check = now + CHECK_EVERY
        if _alive(self.broker):
            self.broker_seen = now
        if _alive(self.holder):
            self.holder_seen = now
        return now - self.broker_seen > self.grace and now - self.holder_seen > self.grace


def _process(pid: Any, ticks: Any) -> tuple[int, int | None] | None:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return pid, ticks if isinstance(ticks, int) and not isinstance(ticks, bool) else None


def _alive(process: tuple[int, int | None] | None) -> bool:
    if process is None:
        return False
    ticks = proc_start_ticks(process[0])
    return ticks is not None and (process[1] is None or ticks == process[1])
