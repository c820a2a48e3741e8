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
from mig_kernel.executor.runtime import NOT_READY, Runtime


class FakeStream:
    """What ``DataPlane._await`` uses of a CuPy stream and its query (runtime.py
    ``compute_query``): work that ends after ``seconds``, with ``error`` (a CUDA error code)
    if it fails, which ``synchronize`` raises."""

    def __init__(self, seconds: float, error: int = 0) -> None:
        self.ends = time.perf_counter() + seconds
        self.error = error
        self.synchronized = 0
        self.queries = 0

    def query(self) -> int:
        self.queries += 1
        return NOT_READY if time.perf_counter() < self.ends else self.error

    def synchronize(self) -> None:
        self.synchronized += 1
        while time.perf_counter() < self.ends:
            pass  # a synchronize returns once the work is over
        if self.error:
            raise RuntimeError(f"cudaErrorCode {self.error}")


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
    plane.rehearse = lambda _working: ran.append(time.perf_counter())
    stream = FakeStream(0.005)
    count = plane._await(stream, stream.query)
    assert count == len(ran) >= 1
    assert all(t < stream.ends for t in ran)  # only while the stream works
    assert stream.synchronized == 0  # it ended well: the poll said so, no driver call more


def test_a_stream_whose_work_failed_ends_the_wait_with_its_error(plane, monkeypatch) -> None:
    """A kernel that fails (an illegal address, say) leaves its stream in error: the poll
    stops at once, and the error is raised as a plain synchronize raises it (CuPy's
    ``Stream.done`` would only ever say "not done")."""
    monkeypatch.setattr(dataplane, "REHEARSE", 0.0002)
    plane.rehearse = lambda _working: None
    stream = FakeStream(0.003, error=700)
    with pytest.raises(RuntimeError, match="700"):
        plane._await(stream, stream.query)
    assert stream.synchronized == 1
    assert time.perf_counter() >= stream.ends


def test_a_rehearsal_can_ask_whether_the_work_still_runs(plane, monkeypatch) -> None:
    """A rehearsal asks between its parts whether the GPU work has ended (server.py
    ``_rehearse``), so that the end is noticed within a part of it, not a whole one."""
    monkeypatch.setattr(dataplane, "REHEARSE", 0.0002)
    asked: list[bool] = []
    kept: list = []

    def rehearse(working) -> None:
        kept.append(working)
        asked.append(working())

    plane.rehearse = rehearse
    stream = FakeStream(0.004)
    assert plane._await(stream, stream.query) == len(asked) >= 2
    assert all(asked[:-1])  # asked while the work ran: still running (the last may be late)
    assert kept[-1]() is False  # and once it has ended, ended


def test_a_failing_rehearsal_is_reported_once_and_stops(plane, monkeypatch, caplog) -> None:
    monkeypatch.setattr(dataplane, "REHEARSE", 0.0002)

    def broken(_working) -> None:
        raise RuntimeError("a bug in a rehearsal")

    plane.rehearse = broken
    stream = FakeStream(0.005)
    with caplog.at_level(logging.ERROR, logger="mig_kernel.executor"):
        assert plane._await(stream, stream.query) == 0
    assert [r.message for r in caplog.records] == [
        "rehearsing the steps after a call failed; rehearsals stop"
    ]
    assert stream.synchronized == 1  # the poll stopped with the rehearsals: synchronized
    assert plane.rehearse is None  # calls synchronize plainly from now on
    again = FakeStream(0.002)
    assert plane._await(again, again.query) == 0


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
        # its echoes were answered (on a sim slice by the watcher or after the call, as
        # ordinary requests) and dropped: nothing kept for a caller, no call confused
        assert not conn.replies and not conn.pending
        assert conn.echoes >= 1
        array = session.run(lambda n: xp.arange(n), 4)  # noqa: F821 (xp: the slice's module)
        np.testing.assert_array_equal(array.get(), np.arange(4))
        with pytest.raises(ZeroDivisionError):
            session.run(lambda: 1 / 0)


def test_an_echo_is_answered_and_anything_else_left_to_be_read() -> None:
    """The executor's rehearsal answers a waiting client's echo without taking it apart
    (``answer_echo``); it must never wait, nor take a request or a part of one, nor fail on a
    lane whose peer has gone."""
    import socket

    from mig_kernel.liveness import PROBE_PREFIX
    from mig_kernel.wire import lane as lane_wire

    assert lane_wire.ECHO_ID.startswith(PROBE_PREFIX)  # the client drops its answer
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sent: list[bytes] = []

    def send(message: bytes) -> bool:
        sent.append(message)
        return True

    with ours, theirs:
        lane_wire.make_blocking(ours)
        started = time.perf_counter()
        assert not lane_wire.answer_echo(ours, send)  # nothing has come: returns at once
        assert time.perf_counter() - started < 1.0
        theirs.sendall(lane_wire.ECHO + lane_wire.ECHO[:5])  # an echo, and a part of the next
        assert lane_wire.answer_echo(ours, send)
        assert sent == [lane_wire.ECHO_REPLY]
        assert not lane_wire.answer_echo(ours, send)  # a part of one is not taken
        theirs.sendall(lane_wire.ECHO[5:])
        request = lane_wire.pack("invoke", {"call_id": "c1"}, ())
        theirs.sendall(request)
        reader = lane_wire.LaneReader(ours)
        assert reader.next(wait=False) == ("echo", {"call_id": lane_wire.ECHO_ID}, ())
        assert not reader.rest or reader.buffered()
        assert not lane_wire.answer_echo(ours, send)  # a request: left where it is
        assert reader.next(wait=False) == ("invoke", {"call_id": "c1"}, ())
        assert lane_wire.whole_message(lane_wire.ECHO_REPLY) == (
            "reply",
            {"call_id": lane_wire.ECHO_ID},
            (),
        )
        theirs.close()
        assert not lane_wire.answer_echo(ours, send)  # end of stream: the next read shows it
        with pytest.raises(lane_wire.LaneBroken):
            reader.next(wait=False)
    assert len(sent) == 1


def test_the_compute_stream_waits_for_the_latest_copies_once(plane) -> None:
    """Once the compute stream was made to wait for the latest copies' event, later calls
    without copies of their own do not make it wait again (it runs in order); a newer
    copy's event is kept."""
    copied, newer = object(), object()
    plane.last_copy = copied
    plane._waited_for(copied)
    assert plane.last_copy is None
    plane.last_copy = newer
    plane._waited_for(copied)  # a call staged before the newer copies
    assert plane.last_copy is newer


def test_the_stream_query_falls_back_to_done_where_cupy_lacks_it() -> None:
    """The GPU wait's query is CuPy's ``runtime.streamQuery`` bound to the compute stream,
    where that returns a status; else one made of ``Stream.done`` (as the wait was before)."""
    import types

    from mig_kernel.executor.runtime import _stream_query

    stream = types.SimpleNamespace(ptr=1234, done=False)
    calls: list[int] = []

    def status(ptr: int) -> int:
        calls.append(ptr)
        return 0

    with_query = types.SimpleNamespace(
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(streamQuery=status))
    )
    assert _stream_query(with_query, stream)() == 0
    assert calls == [1234, 1234]  # checked once, then called
    without = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace()))
    query = _stream_query(without, stream)
    assert query() == NOT_READY
    stream.done = True
    assert query() == 0
