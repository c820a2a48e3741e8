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
