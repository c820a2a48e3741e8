"""The executor's two threads: the main thread runs calls and answers short ones itself; while a
call runs longer, the watcher serves the socket (other requests, the next call's stage-in,
cancel, a shutdown)."""

from __future__ import annotations

import time

import numpy as np
import pytest

import mig_kernel
from mig_kernel.testing import all_free, count


@pytest.fixture
def broker(make_broker):
    return make_broker("--Broker.stats_interval=0.2", layout="H100-80GB:2x1g.10gb")


@pytest.fixture
def session(broker):
    s = mig_kernel.connect(broker=broker.connection_file)
    yield s
    s.close()


def test_a_long_call_leaves_the_executor_answering(session) -> None:
    kept = session.run(lambda: xp.arange(4.0))  # noqa: F821
    future = session.submit(time.sleep, 1.5)
    time.sleep(0.2)  # the call runs now
    started = time.monotonic()
    assert session.ping()["pid"] > 0
    np.testing.assert_array_equal(kept.get(), np.arange(4.0))
    assert time.monotonic() - started < 1.0 and not future.done()
    assert future.result() is None


def test_the_next_call_is_staged_while_one_runs(broker, session) -> None:
    """Its 64 MiB argument is on the slice (counted in the memory the broker shows) before the
    running call ends: stage-in overlaps compute."""
    first = session.submit(time.sleep, 3.0)
    time.sleep(0.2)
    second = session.submit(lambda a: float(a[0]), np.ones(8 * 2**20))

    def staged(status: dict) -> bool:
        return any(s["mine"] and s["memory_used"] >= 64 * 2**20 for s in status["slices"])

    broker.wait_for(staged, timeout=2.5)
    assert not first.done()
    assert first.result() is None and second.result() == 1.0


def test_cancel_interrupts_a_running_call(session) -> None:
    def spin() -> None:
        while True:
            time.sleep(0.01)

    future = session.submit(spin)
    time.sleep(0.3)
    conn = session._connection()
    assert conn.cancel(future, grace=5.0)
    with pytest.raises(KeyboardInterrupt):
        future.result()
    assert session.run(lambda: 7) == 7


def test_cancel_skips_a_queued_call(session) -> None:
    running = session.submit(time.sleep, 1.0)
    queued = session.submit(lambda: "ran")
    time.sleep(0.2)
    assert session._connection().cancel(queued, grace=5.0)
    with pytest.raises(KeyboardInterrupt, match="before it ran"):
        queued.result()
    assert running.result() is None


def test_release_during_a_long_call_retires_the_executor(broker, session) -> None:
    pid = session.ping()["pid"]
    session.submit(time.sleep, 60)
    time.sleep(0.3)
    session.release()  # the executor served a tenant: it must exit, though its call runs on
    status = broker.wait_for(all_free, timeout=20)
    assert count(status, "free") == 2
    with broker.client() as c:
        lease = c.acquire()
        assert lease["executor"]["pid"] != pid
        c.release(lease["id"])
