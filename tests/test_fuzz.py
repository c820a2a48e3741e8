"""The fuzzer: hostile messages against a running broker and a lease's executor (random,
mutated, truncated and oversized frames; correctly signed messages with hostile header and body
fields). Afterwards: 0 crashes, file descriptors and RSS bounded, nothing lost (the lease, its
device data), and both still answer. CI runs 1,000 messages per target; ``make soak`` runs
10,000 (docs/reliability.md quotes its figures)."""

from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest

import mig_kernel
from mig_kernel.procs import pid_alive
from mig_kernel.testing import count, executor_pids
from mig_kernel.wire.connection import read_connection_file
from mig_kernel.wire.executor_spec import CONTROL_SENDER
from mig_kernel.wire.limits import BROKER_MESSAGE_MAX, EXECUTOR_FRAME_MAX
from tests.support.fuzz import Target, fuzz, open_fds, rss

BROKER_TYPES = [
    "hello",
    "acquire",
    "release",
    "heartbeat",
    "status",
    "lease",
    "leases",
    "cancel",
    "drain",
    "undrain",
    "metrics",
    "watch",
]
BROKER_FIELDS = [
    "profile",
    "memory",
    "wait",
    "timeout",
    "ticket",
    "restore",
    "idle_timeout",
    "tag",
    "label",
    "lease_id",
    "lease_ids",
    "spill",
    "slice_id",
    "gpu",
    "user",
    "hub_token",
]
# Not reset, free, nor the broker's shutdown, rekey, spill or become: those are what a genuine
# holder or broker may ask for, and would end the data this test checks is kept.
EXECUTOR_TYPES = ["invoke", "call", "fetch", "cancel", "ping", "ready", "stats", "restore"]
EXECUTOR_FIELDS = ["call_id", "timeout", "fn", "args", "op", "items", "target", "path", "key"]
MiB = 1 << 20


def _fuzz_both(make_broker, per_target: int) -> dict[str, float]:
    broker = make_broker(layout="H100-80GB:2x1g.10gb")
    session = mig_kernel.connect(broker=broker.connection_file)
    try:
        return _fuzz_session(broker, session, per_target)
    finally:
        session.close()


def _fuzz_session(broker, session, per_target: int) -> dict[str, float]:
    assert broker.proc is not None
    broker_pid, executor_pid = broker.proc.pid, session.ping()["pid"]
    kept = session.put(np.arange(1000.0))
    info = read_connection_file(broker.connection_file)
    db = sqlite3.connect(str(broker.state_dir / "broker.sqlite"))
    (control_key,) = db.execute(
        "SELECT control_key FROM executors WHERE pid = ?", (executor_pid,)
    ).fetchone()
    db.close()
    before = {
        "broker_fds": open_fds(broker_pid),
        "broker_rss": rss(broker_pid),
        "executor_fds": open_fds(executor_pid),
        "executor_rss": rss(executor_pid),
    }
    started = time.monotonic()
    with broker.client() as c:
        broker_target = Target(
            info.endpoint,
            c.key,
            c.client_id,
            BROKER_TYPES,
            BROKER_FIELDS,
            BROKER_MESSAGE_MAX,
            extra_keys=[(None, info.key_bytes)],  # hellos, signed with the connection key
        )
        to_broker = fuzz(broker_target, per_target, 14, lambda: pid_alive(broker_pid))
    executor_target = Target(
        session.executor_endpoint,
        session.key,
        session.id,
        EXECUTOR_TYPES,
        EXECUTOR_FIELDS,
        EXECUTOR_FRAME_MAX,
        extra_keys=[(CONTROL_SENDER, control_key)],
    )
    to_executor = fuzz(executor_target, per_target, 15, lambda: pid_alive(executor_pid))
    took = time.monotonic() - started

    # 0 crashes: the same processes; nothing lost: the lease and its device data
    assert pid_alive(broker_pid) and broker.proc.poll() is None
    assert executor_pids(broker.state_dir)[session.slice["id"]] == executor_pid
    assert session.ping()["pid"] == executor_pid
    np.testing.assert_array_equal(kept.get(), np.arange(1000.0))
    assert session.run(lambda a: float(a.sum()), np.ones(5)) == 5.0
    with broker.client() as c:
        status = c.status()
        assert count(status, "broken") == 0
        assert c.heartbeat([session.id])[session.id]["state"] == "active"
    after = {
        "broker_fds": open_fds(broker_pid),
        "broker_rss": rss(broker_pid),
        "executor_fds": open_fds(executor_pid),
        "executor_rss": rss(executor_pid),
    }
    for name in ("broker_fds", "executor_fds"):
        assert after[name] <= before[name] + 16, f"{name}: {before[name]} -> {after[name]}"
    for name in ("broker_rss", "executor_rss"):
        grown = after[name] - before[name]
        assert grown < 100 * MiB, f"{name} grew by {grown / MiB:.0f} MiB"
    for report in (to_broker, to_executor):
        assert report.sent == per_target
        # everything but the oversized frames (their connection is dropped) gets an answer
        assert report.answered >= 0.95 * (report.sent - report.oversized), report
    figures = {
        "messages": 2 * per_target,
        "seconds": round(took, 1),
        "broker_answers": to_broker.answered,
        "executor_answers": to_executor.answered,
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": v for k, v in after.items()},
    }
    print("fuzz figures:", figures)
    return figures


def test_fuzzer_short(make_broker) -> None:
    """CI's version: 1,000 hostile messages to the broker and 1,000 to an executor."""
    _fuzz_both(make_broker, 1000)


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(900)
def test_fuzzer_long(make_broker) -> None:
    """``make soak``: 10,000 hostile messages to each."""
    _fuzz_both(make_broker, 10_000)
