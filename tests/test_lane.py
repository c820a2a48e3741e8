"""The local lane (wire/lane.py): the lease holder's direct stream to its executor.

Every data-plane test runs through the lane already (it is the default on ipc); these check
what is particular to it: who may open one, that a broken one falls back to the signed
ZeroMQ path without losing a reply, and that it can be turned off.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest

import mig_kernel
from mig_kernel.wire import lane as lane_wire
from mig_kernel.wire.errors import MigKernelError


@pytest.fixture
def broker(make_broker):
    return make_broker(layout="H100-80GB:2x1g.10gb")


@pytest.fixture
def session(broker):
    s = mig_kernel.connect(broker=broker.connection_file)
    yield s
    s.close()


def _offer(session) -> dict:
    """A fresh lane offer (address and one-time token), asked for over the signed ZeroMQ
    socket as the client does (its own lane set aside meanwhile)."""
    conn = session._connection()
    own, conn.lane = conn.lane, None
    try:
        return conn._call("lane", {})
    finally:
        conn.lane = own


def test_calls_go_by_the_lane_with_output_in_order(session, capsys) -> None:
    def chatty(n):
        for i in range(n):
            print(f"line {i}")
        return xp.arange(n) * 2  # noqa: F821 (xp: the slice's module)

    result = session.run(chatty, 3)
    assert session._connection().lane_active()
    np.testing.assert_array_equal(result.get(), np.arange(3) * 2)
    assert capsys.readouterr().out == "line 0\nline 1\nline 2\n"
    with pytest.raises(ZeroDivisionError):
        session.run(lambda: 1 / 0)
    assert session.run(lambda: 7) == 7


def test_a_token_opens_one_lane_once(session) -> None:
    session.run(lambda: None)  # the client's own lane is open
    offer = _offer(session)
    sock = lane_wire.connect(offer["address"], offer["token"])
    sock.sendall(lane_wire.pack("ping", {"call_id": "p1"}))
    kind, body, _ = lane_wire.receive(sock)
    assert kind == "reply" and body["pid"] > 0
    sock.close()
    with pytest.raises(OSError):  # used once: refused (the executor closes the connection)
        lane_wire.connect(offer["address"], offer["token"], timeout=2.0)
    with pytest.raises(OSError):
        lane_wire.connect(offer["address"], os.urandom(lane_wire.TOKEN_BYTES), timeout=2.0)
    assert session.run(lambda: 3) == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_another_uid_is_refused_even_with_the_token(session) -> None:
    session.run(lambda: None)
    offer = _offer(session)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, then try the genuine token
        os.close(read_end)
        code = b"?"
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                lane_wire.connect(offer["address"], offer["token"], timeout=2.0)
                code = b"opened"
            except OSError:
                code = b"refused"
        finally:
            os.write(write_end, code)
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == b"refused"
    assert session.run(lambda: 4) == 4


def test_a_broken_lane_falls_back_to_zeromq(session) -> None:
    kept = session.run(lambda: xp.ones(8))  # noqa: F821
    conn = session._connection()
    assert conn.lane_active()
    conn.lane.shutdown(socket.SHUT_RDWR)  # as if the stream broke under the client
    assert session.run(lambda a: float(a.sum()), kept) == 8.0
    assert not conn.lane_active()
    future = session.submit(time.sleep, 0.05)
    assert future.result() is None
    np.testing.assert_array_equal(kept.get(), np.ones(8))


def test_lane_off_uses_the_signed_socket(broker, monkeypatch) -> None:
    monkeypatch.setenv("MIG_KERNEL_LANE", "0")
    with mig_kernel.connect(broker=broker.connection_file) as s:
        assert s.run(lambda: 5) == 5
        assert not s._connection().lane_active()


def test_a_lane_is_not_offered_by_a_tcp_executor(make_broker) -> None:
    broker = make_broker("--executor-transport", "tcp", layout="H100-80GB:1g.10gb")
    with mig_kernel.connect(broker=broker.connection_file) as s:
        assert s.run(lambda: 6) == 6
        assert not s._connection().lane_active()
        with pytest.raises(MigKernelError, match="no lane on a tcp executor"):
            s._connection()._call("lane", {})


def test_a_reply_the_lane_cannot_carry_comes_by_zeromq(session) -> None:
    session.run(lambda: None)
    conn = session._connection()
    conn.lane.shutdown(socket.SHUT_RD)  # the executor's sends into the lane fail from now on
    future = session.submit(lambda: 41 + 1)  # sent by the lane (its write side still works)
    assert future.result(timeout=30) == 42  # the result came by the signed socket
    assert not conn.lane_active()
    assert session.run(lambda: 43) == 43


def test_plain_arguments_and_results_by_the_lane_and_by_zeromq(session) -> None:
    def echo(*args, **kwargs):
        return repr((args, kwargs))

    args = (1, 2.5, "s", b"b", None, True, 3 + 4j, 2**80)
    expected = repr((args, {"k": "v"}))
    assert session.run(echo, *args, k="v") == expected  # in the lane's pickle, as they are
    assert session.run(echo, "x" * 10_000) == repr((("x" * 10_000,), {}))  # long: pickled
    conn = session._connection()
    assert conn.lane_active()
    conn.lane.shutdown(socket.SHUT_WR)  # the client's next send into the lane fails
    assert session.run(echo, *args, k="v") == expected  # the same values, by ZeroMQ
    assert not conn.lane_active()
    assert session.run(lambda: 2**70) == 2**70


def test_the_lane_reader_takes_every_message_read_together() -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with mine, theirs:
        reader = lane_wire.LaneReader(mine)
        assert reader.next(wait=False) is None  # nothing has come
        big = b"z" * (3 * lane_wire.LaneReader.CHUNK)
        theirs.sendall(lane_wire.pack("a", {"n": 1}) + lane_wire.pack("b", {"n": 2}, (big,)))
        assert reader.next() == ("a", {"n": 1}, ())
        kind, body, frames = reader.next()  # the rest of the second, read whole
        assert (kind, body, frames) == ("b", {"n": 2}, (big,))
        assert not reader.buffered()
        theirs.sendall(lane_wire.pack("c", {}) + lane_wire.pack("d", {}))
        assert reader.next()[0] == "c"
        assert reader.buffered()  # the socket shows nothing more: the reader holds it
        assert reader.next(wait=False)[0] == "d"
        theirs.sendall(b"\0\0\0")  # a length that stops half-way, then the end
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(lane_wire.LaneBroken):
            reader.next()


def test_a_client_waiting_on_its_lane_wakes_for_the_liveness_checks() -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with mine, theirs:
        lane_wire.receive_timeout(mine, 0.05)
        reader = lane_wire.LaneReader(mine)
        started = time.monotonic()
        assert reader.next(wait=True) is None  # the receive timeout: nothing came
        assert 0.03 < time.monotonic() - started < 2.0
        theirs.sendall(lane_wire.pack("late", {"ok": True}))
        assert reader.next(wait=True) == ("late", {"ok": True}, ())


def test_handles_ride_the_lane_as_numbers_and_zeromq_as_handles(session) -> None:
    def combine(a, b, *, scale, c=None):
        return float((a + b).sum()) * scale + (0 if c is None else float(c.sum()))

    a = session.put(np.ones(4))
    b = session.put(np.full(4, 2.0))
    c = session.run(lambda: xp.arange(3.0))  # noqa: F821 (a handle made on the slice)
    conn = session._connection()
    # handles (positional and keyword) and plain values: numbers in the lane's own pickle
    assert conn._handle_arguments((a, b), {"scale": 2, "c": c}) is not None
    assert session.run(combine, a, b, scale=2, c=c) == 27.0
    assert conn._handle_arguments((a, np.ones(2)), {}) is None  # an array: pickled as before
    assert session.run(combine, a, np.ones(4), scale=1) == 8.0
    assert conn.lane_active()
    conn.lane.shutdown(socket.SHUT_WR)  # the client's next send into the lane fails
    assert session.run(combine, a, b, scale=2, c=c) == 27.0  # the same, by ZeroMQ
    assert not conn.lane_active()


def test_a_freed_handle_by_the_lane_is_refused_by_name(session) -> None:
    a = session.put(np.ones(4))
    conn = session._connection()
    conn.to_free.append(a.handle)  # freed behind the handle's back, as the call goes
    with pytest.raises(KeyError, match=f"handle {a.handle} is not on this executor"):
        session.run(lambda x: float(x.sum()), a)
    assert session.run(lambda: 3) == 3


@pytest.mark.parametrize(
    "handles",
    [[5], [0, "k"], ["missing"], "0", [1.5]],
    ids=["index", "not-int", "key", "str", "float"],
)
def test_a_malformed_handles_field_is_refused(session, handles) -> None:
    from mig_kernel import remote
    from mig_kernel.datapath import Outgoing

    conn = session._connection()
    assert session.run(lambda: 1) == 1
    call_id = f"bad-handles-{handles!r}"
    invocation = remote.Invocation(conn, call_id, False, Outgoing(), None)
    conn.pending[call_id] = invocation
    fn = remote._FUNCTIONS.dumps(lambda x, k="v": x)
    conn._send(
        "invoke",
        {
            "call_id": call_id,
            "timeout": None,
            "fn": fn,
            "argv": (("s",), {"k": "v"}),
            "handles": handles,
        },
    )
    with pytest.raises(MigKernelError, match="field 'handles'"):
        invocation.result(timeout=30)
    assert session.run(lambda: 2) == 2


def test_no_spinning_where_the_process_may_use_one_cpu() -> None:
    """Whether to spin is decided by the CPUs the process may run on (a container's cpuset,
    taskset), not the machine's count: two processes spinning for each other on one CPU take
    turns by the scheduler's time slice."""
    import subprocess
    import sys

    probe = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from mig_kernel import procs, remote; from mig_kernel.executor import server; "
        "print(procs.usable_cpus(), remote.SPIN, server.SPIN)"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("SPIN_US")}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.split() == ["1", "0.0", "0.0"], done.stderr


@pytest.mark.parametrize(
    ("fields", "refusal"),
    [
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": -1}, "timeout must be a positive number"),
        ({"timeout": "1"}, "timeout must be a positive number"),
        ({"argv": [(2,), {}]}, "field 'argv'"),
        ({"argv": ((2,),)}, "field 'argv'"),
        ({"free": "all"}, "free needs ids"),
    ],
    ids=["nan-timeout", "negative-timeout", "str-timeout", "list-argv", "short-argv", "free"],
)
def test_a_lane_call_the_short_path_declines_is_refused_by_name(session, fields, refusal) -> None:
    """The executor serves the usual lane call in fewer steps (server.py ``_lane_job``); a
    request it declines takes the usual path, which names what is wrong, and the lane goes on."""
    from mig_kernel import remote
    from mig_kernel.datapath import Outgoing

    def double(x):
        return 2 * x

    assert session.run(double, 4) == 8  # the function is loaded: the short path would serve it
    conn = session._connection()
    call_id = f"declined-{sorted(fields)}"
    invocation = remote.Invocation(conn, call_id, False, Outgoing(), None)
    conn.pending[call_id] = invocation
    body = {"call_id": call_id, "timeout": None, "fn": remote._FUNCTIONS.dumps(double)}
    conn._send("invoke", {**body, "argv": ((2,), {}), **fields})
    with pytest.raises(MigKernelError, match=refusal):
        invocation.result(timeout=30)
    assert session.run(double, 5, timeout=30) == 10
    assert conn.lane_active()


def test_the_usual_lane_call_takes_the_short_path(tmp_path) -> None:
    """What the short path accepts, and that the job it makes is the usual path's."""
    from mig_kernel import remote
    from mig_kernel.testing import executor_in_process
    from mig_kernel.wire import payload
    from mig_kernel.wire.messages import Message

    def double(x):
        return 2 * x

    fn = remote._FUNCTIONS.dumps(double)
    usual = {"call_id": "c1", "timeout": None, "fn": fn, "argv": ((3,), {})}
    with executor_in_process(tmp_path) as (server, lane, _client_end):
        assert server._lane_job(lane, usual) is None  # a function not loaded yet: usual path
        server._dispatch(lane.route, Message("invoke", dict(usual), b"", 0.0))
        expected = server.dataplane.next_ready()
        job = server._lane_job(lane, dict(usual))
        assert job is not None
        for field in ("kind", "route", "call_id", "fn", "staged", "ready_event", "input_bytes"):
            assert getattr(job, field) == getattr(expected, field), field
        empty = {**usual, "args": payload.EMPTY_ARGS}
        del empty["argv"]
        assert server._lane_job(lane, empty).staged == ((), {})
        assert server._lane_job(lane, {**usual, "timeout": 2.5}) is not None
        # Handle numbers the executor holds, and handles to free, as the usual path takes them.
        kept, spare = server.dataplane.store("kept"), server.dataplane.store("spare")
        by_number = {**usual, "argv": ((kept,), {}), "handles": [0], "free": [spare]}
        server._dispatch(lane.route, Message("invoke", dict(by_number), b"", 0.0))
        expected = server.dataplane.next_ready()
        assert expected.staged == (("kept",), {}) and spare not in server.dataplane.handles
        spare = server.dataplane.store("spare")
        rehearsed = server._lane_job(lane, {**by_number, "free": [spare]}, free_now=False)
        assert rehearsed.staged == expected.staged and spare in server.dataplane.handles
        job = server._lane_job(lane, {**by_number, "free": [spare]})
        assert (job.staged, job.handles) == (expected.staged, [0])
        assert spare not in server.dataplane.handles
        for unusual in (
            {"handles": [0]},  # handle 3: not on this executor (the usual path names it)
            {"argv": ((kept,), {}), "handles": [1]},
            {"argv": ((kept,), {}), "handles": 0},
            {"argv": None, "args": payload.EMPTY_ARGS, "handles": [0]},
            {"free": "all"},
            {"free": [True]},
            {"timeout": 0},
            {"timeout": True},
            {"call_id": 7},
            {"argv": None, "args": b"other"},
            {"fn": b"not this executor's"},
        ):
            assert server._lane_job(lane, {**usual, **unusual}) is None, unusual
        server.sealed = True
        assert server._lane_job(lane, usual) is None
