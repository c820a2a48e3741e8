"""Protocol faults of issue 14 (defects 1, 2, 5, 6, 7 and 9), each reproduced for real: hung
executors (SIGSTOP), a broker restart under waiting acquires, hostile field values, unbounded
state and oversized unauthenticated frames. docs/reliability.md, "Protocol faults"."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sqlite3
import threading
import time
import types
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

import mig_kernel
from mig_kernel import liveness
from mig_kernel.testing import count, executor_pids, wait_until
from mig_kernel.wire import errors as E
from mig_kernel.wire.connection import read_connection_file
from mig_kernel.wire.messages import PROTOCOL_VERSION, _mac, peek_header
from mig_kernel.wire.signing import ReplayGuard

TCP = ("--executor-transport", "tcp")


def peak_rss(pid: int) -> int:
    """Bytes of the process's peak resident set (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


# -- defect 1: one stopped executor never freezes the broker; it is replaced, its lease told why
def test_a_stopped_executor_is_replaced_and_the_broker_keeps_answering(make_broker) -> None:
    broker = make_broker(
        "--Broker.stats_interval=0.05",
        "--Broker.executor_answer_timeout=3",
        layout="H100-80GB:2x1g.10gb",
    )
    session = mig_kernel.connect(broker=broker.connection_file)
    pid = session.ping()["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        slowest, started = 0.0, time.monotonic()
        with broker.client() as c:
            while executor_pids(broker.state_dir).get(session.slice["id"]) == pid:
                assert time.monotonic() - started < 30, "the stopped executor was never replaced"
                t0 = time.monotonic()
                assert count(c.status(), "broken") == 0
                slowest = max(slowest, time.monotonic() - t0)
                time.sleep(0.05)
            assert slowest < 5.0, f"the broker stalled {slowest:.1f} s on a stopped executor"
            reply = c.heartbeat([session.id])[session.id]
        assert reply["state"] == "active"
        assert "stopped answering" in reply["replaced"]
        # the holder learns why (heartbeats and the lease say it), and the lease works on
        session.refresh()
        assert "stopped answering" in session.lease["executor"]["replaced"]
        assert session.run(lambda: 2) == 2
        assert session.ping()["pid"] != pid
    finally:
        resume(pid)
        session.close()


def test_sends_to_an_executor_that_never_reads_never_block(tmp_path: Path) -> None:
    """The pool's half of defect 1, in-process: a peer that accepts the connection and never
    reads (what a stopped executor is to the broker) fills its queue; the pool's sends then
    return at once instead of blocking the broker's loop, and the executor counts as not
    answering."""
    from mig_kernel.broker.pool import ExecutorPool
    from mig_kernel.broker.state import Executor

    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    silent.linger = 0
    endpoint = f"ipc://{tmp_path / 'silent.sock'}"
    silent.bind(endpoint)
    pool = ExecutorPool(ctx, tmp_path, tmp_path)
    ex = Executor("E-silent", "S-0", endpoint, b"c" * 32, b"t" * 32, None)
    pool._connect(ex, 60.0)
    done = threading.Event()

    def flood() -> None:
        for _ in range(20_000):
            pool.request(ex, "restore", {"path": "p" * 4000})
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(30), "a send to an executor that does not read blocked the caller"
    assert ex.awaiting_since is not None  # it counts as not answering from then on
    assert len(pool.pending) < 20_000  # what was not sent is not awaited either
    pool.forget(ex)
    silent.close()
    ctx.term()


# -- defect 2: waiting acquires survive a broker restart ---------------------------------------
def test_a_waiting_acquire_survives_a_broker_restart(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb")
    holder = broker.client()
    lease = holder.acquire()
    outcome: dict[str, object] = {}
    queued = threading.Event()

    def wait_for_a_slice() -> None:
        with broker.client() as waiter:
            try:
                outcome["lease"] = waiter.acquire(timeout=60, on_queued=lambda *_: queued.set())
                waiter.release(outcome["lease"]["id"])  # type: ignore[index]
            except Exception as exc:
                outcome["error"] = exc

    thread = threading.Thread(target=wait_for_a_slice)
    thread.start()
    assert queued.wait(15)
    broker.kill()
    time.sleep(3.0)  # the waiter's keepalives queue up meanwhile, and arrive stale
    broker.start()
    time.sleep(2.0)  # the stale keepalives are refused as replayed: the waiter keeps waiting
    assert "error" not in outcome, outcome.get("error")
    holder.release(lease["id"])
    thread.join(30)
    holder.close()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["lease"]["slice"]["id"] == lease["slice"]["id"]  # type: ignore[index]


# -- defect 5: every number finite and bounded, refusals name the field ----------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e300])
def test_hostile_numbers_are_refused_by_the_broker_naming_the_field(make_broker, value) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb")
    with broker.client() as c:
        acquire = lambda **body: c.channel.call("acquire", {"wait": False, **body})  # noqa: E731
        with pytest.raises(E.BadRequest, match="'timeout'"):
            acquire(timeout=value)
        with pytest.raises(E.BadRequest, match="'idle_timeout'"):
            acquire(idle_timeout=value)
        with pytest.raises(E.BadRequest, match="'memory'"):
            acquire(memory=2**64 - 1)
        with pytest.raises(E.BadRequest, match=r"'wait'"):
            acquire(wait=value)
        assert c.leases() == [] and count(c.status(), "free") == 1


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 1e300])
def test_a_hostile_call_timeout_is_refused_and_the_executor_lives(make_broker, value) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb")
    with mig_kernel.connect(broker=broker.connection_file) as s:
        pid = s.ping()["pid"]
        kept = s.put(np.arange(4.0))
        with pytest.raises(E.BadRequest, match="timeout"):
            s.run(lambda: 1, timeout=value)
        assert s.ping()["pid"] == pid  # the executor lives, and so does the device data
        np.testing.assert_array_equal(kept.get(), np.arange(4.0))


def _signed(key: bytes, header: dict) -> list[bytes]:
    raw = msgpack.packb(header, use_bin_type=True)
    return [_mac(key, raw, []), raw]


def test_a_timestamp_of_nan_is_refused_every_time(make_broker) -> None:
    guard = ReplayGuard(30.0)
    assert guard.check(b"i" * 16, math.nan) is not None
    assert guard.check(b"i" * 16, math.nan) is not None
    header = {"v": PROTOCOL_VERSION, "type": "hello", "id": b"n" * 16, "ts": math.nan}
    with pytest.raises(E.MalformedMessage, match="'ts'"):
        peek_header(_signed(b"k" * 32, {**header, "from": None, "re": None, "body": {}}))
    broker = make_broker(layout="H100-80GB:1g.10gb")
    info = read_connection_file(broker.connection_file)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(info.endpoint)
    try:
        frames = _signed(info.key_bytes, {**header, "from": None, "re": None, "body": {}})
        for _ in range(2):  # refused, and refused again: never accepted
            sock.send_multipart(frames)
            assert sock.poll(5000)
            answer = sock.recv_multipart()
            assert answer[0] == b"" and b"ts" in answer[2], answer
    finally:
        sock.close()
        ctx.term()
    assert count(broker.status(), "free") == 1


# -- defect 6: bounded strings, expiring client rows ------------------------------------------
def test_huge_strings_are_refused_and_client_rows_stay_bounded(make_broker) -> None:
    broker = make_broker(
        "--Broker.sessions_per_user=20", "--Broker.client_expiry=2", layout="H100-80GB:1g.10gb"
    )
    with broker.client() as c:
        with pytest.raises(E.BadRequest, match="ticket is 3000000 characters long"):
            c.request("acquire", wait=False, ticket="t" * 3_000_000)
        with pytest.raises(E.BadRequest, match="restore is 100000 characters long"):
            c.request("acquire", wait=False, restore="r" * 100_000)
        lease = c.acquire(wait=False)
    db_path = broker.state_dir / "broker.sqlite"

    def rows() -> int:
        db = sqlite3.connect(str(db_path))
        try:
            return db.execute("SELECT count(*) FROM clients").fetchone()[0]
        finally:
            db.close()

    early = broker.client()
    for _ in range(200):
        broker.client().close()
    assert rows() <= 21  # the user's 20 newest sessions (the lease holder's among them)
    wait_until(lambda: rows() == 1, timeout=15, what="idle sessions expire")
    # a client whose idle session was dropped opens another by itself
    dropped = early.client_id
    assert count(early.status(), "leased") == 1 and early.client_id != dropped
    early.close()
    with broker.client() as c:  # the lease's session stayed: it holds a lease
        assert c.heartbeat([lease["id"]])[lease["id"]]["state"] == "active"
        c.request("release", lease_id=lease["id"])


# -- defect 7: no socket buffers a huge unauthenticated frame ---------------------------------
def test_an_oversized_unauthenticated_frame_does_not_grow_a_tcp_executor(make_broker) -> None:
    broker = make_broker(*TCP, layout="H100-80GB:1g.10gb")
    with mig_kernel.connect(broker=broker.connection_file) as s:
        pid = s.ping()["pid"]
        before = peak_rss(pid)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(s.executor_endpoint)
        try:
            sock.send_multipart([b"s" * 32, bytes(512 << 20)], copy=False)
            time.sleep(2.0)  # the executor reads (or drops) it meanwhile
        finally:
            sock.close(linger=0)
            ctx.term()
        grown = peak_rss(pid) - before
        assert grown < 64 << 20, f"the executor's peak RSS grew by {grown >> 20} MiB"
        # a legitimate array larger than one frame still travels (in several frames)
        big = np.random.default_rng(7).standard_normal((80 << 20) // 8)
        np.testing.assert_array_equal(s.run(lambda a: a * 2, big, to_host=True), big * 2)
        boxed = types.SimpleNamespace(array=big)  # inside another object: a host array there
        assert s.run(lambda box: float(box.array.sum()), boxed) == float(big.sum())
        assert s.ping()["pid"] == pid


# -- defect 9: a stopped executor is noticed by missed answers, not only its pid --------------
def test_a_call_on_a_stopped_executor_raises_about_its_timeout(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb")
    with mig_kernel.connect(broker=broker.connection_file) as s:
        pid = s.ping()["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="not answered"):
                s.run(lambda: 1, timeout=2)
            took = time.monotonic() - started
            assert took < 6.0, f"raised after {took:.1f} s for a call with timeout=2"
        finally:
            resume(pid)


def test_without_a_timeout_a_silent_executor_is_reported_but_long_calls_run(
    make_broker, monkeypatch
) -> None:
    monkeypatch.setattr(liveness, "SILENCE_LIMIT", 3.0)
    broker = make_broker(layout="H100-80GB:1g.10gb")
    with mig_kernel.connect(broker=broker.connection_file) as s:
        # a legitimately long call keeps answering (its watcher thread serves the socket)
        assert s.run(lambda: __import__("time").sleep(6) or 7) == 7
        pid = s.ping()["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(E.ExecutorUnavailable, match="has not answered for"):
                s.run(lambda: 1)
            assert time.monotonic() - started < 8.0
        finally:
            resume(pid)
