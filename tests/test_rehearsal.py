"""Rehearsals: while a call waits, the steps that follow it are run again to no effect, so
that they run warm when it ends (remote.py and executor/dataplane.py, ``REHEARSE``; why in
docs/performance.md). These check that a rehearsing wait still ends as a plain one does and
changes nothing. The executor's side rehearses while a GPU stream works, so the stream here
is a test double (no GPU on this machine); tests/test_gpu.py runs it on a real one."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import zmq

import mig_kernel
from mig_kernel import remote
from mig_kernel.executor import dataplane
from mig_kernel.executor.runtime import Runtime


class FakeStream:
    """What ``DataPlane._await`` uses of a CuPy stream: ``done`` once ``seconds`` passed."""

    def __init__(self, seconds: float) -> None:
        self.ends = time.perf_counter() + seconds
        self.synchronized = 0

    @property
    def done(self) -> bool:
        return time.perf_counter() >= self.ends

    def synchronize(self) -> None:
        self.synchronized += 1


@pytest.fixture
def plane():
    context = zmq.Context()
    plane = dataplane.DataPlane(
        Runtime(name="numpy", xp=np, warm_seconds=0.0), context, None, print
    )
    yield plane
    plane.close()
    context.term()


def test_a_stream_wait_rehearses_then_synchronizes(plane, monkeypatch) -> None:
    monkeypatch.setattr(dataplane, "REHEARSE", 0.0002)
    ran: list[float] = []
    plane.rehearse = lambda: ran.append(time.perf_counter())
    stream = FakeStream(0.005)
    count = plane._await(stream)
    assert count == len(ran) >= 1
    assert all(t < stream.ends for t in ran)  # only while the stream works
    assert stream.synchronized == 1  # its errors are raised as by a plain synchronize


def test_a_failing_rehearsal_is_reported_once_and_stops(plane, monkeypatch, caplog) -> None:
    monkeypatch.setattr(dataplane, "REHEARSE", 0.0002)

    def broken() -> None:
        raise RuntimeError("a bug in a rehearsal")

    plane.rehearse = broken
    stream = FakeStream(0.005)
    with caplog.at_level(logging.ERROR, logger="mig_kernel.executor"):
        assert plane._await(stream) == 0
    assert [r.message for r in caplog.records] == [
        "rehearsing the steps after a call failed; rehearsals stop"
    ]
    assert stream.synchronized == 1
    assert plane.rehearse is None  # calls synchronize plainly from now on
    assert plane._await(FakeStream(0.002)) == 0


def test_a_client_rehearses_while_it_spins_and_gets_every_result(make_broker, monkeypatch, capsys):
    monkeypatch.setattr(remote, "SPIN", 1.0)  # spin through the whole call
    monkeypatch.setattr(remote, "REHEARSE", 0.0002)
    broker = make_broker(layout="H100-80GB:1x1g.10gb")
    with mig_kernel.connect(broker=broker.connection_file) as session:

        def slow(x, seconds=0.02, say=""):
            import time

            if say:
                print(say)
            time.sleep(seconds)
            return x + 1

        assert session.run(slow, 1) == 2
        conn = session._connection()
        assert conn.lane_active() and conn.rehearsals >= 1
        before = conn.rehearsals
        # output during the wait is handled in order; results of every kind still come back
        assert session.run(slow, 2, say="half way") == 3
        assert capsys.readouterr().out == "half way\n"
        assert session.run(slow, 3) == 4
        assert conn.rehearsals > before
        array = session.run(lambda n: xp.arange(n), 4)  # noqa: F821 (xp: the slice's module)
        np.testing.assert_array_equal(array.get(), np.arange(4))
        with pytest.raises(ZeroDivisionError):
            session.run(lambda: 1 / 0)


def test_a_peek_rehearses_a_receive_and_reads_nothing() -> None:
    """The executor's rehearsal looks at its lane (``peek``): it must neither wait, nor take
    what has come, nor fail on a lane whose peer has gone."""
    import socket

    from mig_kernel.wire import lane as lane_wire

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        lane_wire.make_blocking(ours)
        started = time.perf_counter()
        lane_wire.peek(ours)  # nothing has come: returns at once
        assert time.perf_counter() - started < 1.0
        request = lane_wire.pack("invoke", {"call_id": "c1"}, ())
        theirs.sendall(request)
        lane_wire.peek(ours)
        lane_wire.peek(ours)
        assert lane_wire.LaneReader(ours).next(wait=False) == ("invoke", {"call_id": "c1"}, ())
        theirs.close()
        lane_wire.peek(ours)  # end of stream: shown by the next read, not by the peek
        with pytest.raises(lane_wire.LaneBroken):
            lane_wire.LaneReader(ours).next(wait=False)
