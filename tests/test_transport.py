"""The tcp executor transport (``--executor-transport tcp``): executors on loopback ports, array
data in the signed messages, no shared memory; handles, errors, output, bad input, broker
restarts, the warm pool and idle spill/restore work as over ipc."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

import mig_kernel
from mig_kernel import RemoteArray
from mig_kernel.testing import all_free, count, executor_pids, run_cli
from mig_kernel.wire.messages import decode, encode, refusal_reason

TCP = ("--executor-transport", "tcp")


class NotebookError(Exception):
    """An exception type of the caller's own."""


@pytest.fixture
def tcp_session(make_broker):
    broker = make_broker(*TCP, layout="H100-80GB:2x1g.10gb")
    s = mig_kernel.connect(broker=broker.connection_file)
    s.broker_process = broker  # type: ignore[attr-defined]
    yield s
    s.close()


def arena_files(session: mig_kernel.Session) -> list[Path]:
    """Arena segment files of this session's lease, wherever the arena would put them."""
    pattern = f"mig-kernel-{os.getuid()}-p*-{session.id.removeprefix('L-')}-*"  # p: creator
    found: list[Path] = []
    for directory in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        if directory.is_dir():
            found.extend(directory.glob(pattern))
    return found


def mapped_arena_segments(pid: int) -> list[str]:
    """Arena segments the executor process has mapped (its /proc maps)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [line for line in maps.splitlines() if f"mig-kernel-{os.getuid()}-" in line]


def test_tcp_lease_runs_functions_with_arrays_and_keeps_handles(tcp_session) -> None:
    s = tcp_session
    assert s.executor_endpoint.startswith("tcp://127.0.0.1:")

    def fn(x, y, *, scale):
        return (xp.sqrt(x) + y) * scale  # noqa: F821 (xp is the slice's array module)

    x = np.arange(10, dtype=np.float64)
    kept = s.run(fn, x, np.ones(10), scale=2.0)
    assert isinstance(kept, RemoteArray) and (kept.shape, kept.dtype) == ((10,), np.float64)
    expected = (np.sqrt(x) + 1.0) * 2.0
    np.testing.assert_allclose(kept.get(), expected)
    again = s.run(lambda a, b: a + b, kept, x, to_host=True)  # the handle moves no data
    assert isinstance(again, np.ndarray)
    np.testing.assert_allclose(again, expected + x)
    assert s.run(lambda a: id(a), kept) == s.run(lambda a: id(a), kept)  # same device object


def test_large_arrays_travel_in_the_messages_and_come_back_writable(tcp_session) -> None:
    big = np.random.default_rng(1).standard_normal((512, 1024))  # 4 MiB: a zero-copy frame
    back = tcp_session.run(lambda a: a * 3, big, to_host=True)
    np.testing.assert_array_equal(back, big * 3)
    back[0, 0] = 42.0  # the user owns the host copy
    small = tcp_session.run(lambda: xp.arange(4), to_host=True)  # noqa: F821
    small += 1
    np.testing.assert_array_equal(small, np.arange(1, 5))


@pytest.mark.parametrize(
    "array",
    [
        np.array(3.5),
        np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2],
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "i4"), ("b", "f8")]),
        np.zeros((0, 3), dtype=np.float32),
        np.arange(6, dtype=">u2"),
    ],
    ids=["0-d", "strided", "fortran", "structured", "empty", "big-endian"],
)
def test_any_array_round_trips_exactly_over_tcp(tcp_session, array: np.ndarray) -> None:
    back = tcp_session.run(lambda a: a, array, to_host=True)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_an_argument_is_captured_when_the_call_is_sent(tcp_session) -> None:
    a = np.zeros(100_000)
    future = tcp_session.submit(lambda v: float(v.sum()), a)
    a[:] = 1.0  # after submit: the call must still see the zeros
    assert future.result() == 0.0


def test_remote_exceptions_output_and_call_level_operations(tcp_session, capsys) -> None:
    s = tcp_session

    def fails():
        print("before the error")
        raise NotebookError("bad input on the slice")

    with pytest.raises(NotebookError, match="bad input on the slice") as info:
        s.run(fails)
    assert "fails" in info.value.remote_traceback
    assert "before the error" in capsys.readouterr().out
    put = s.put(np.arange(5, dtype=np.int16))
    np.testing.assert_array_equal(s.get(put), np.arange(5, dtype=np.int16))
    np.testing.assert_array_equal(s.alloc((2, 3), "float32").get(), np.zeros((2, 3)))
    assert s.run(lambda: 42) == 42


def test_a_tcp_session_creates_no_shared_memory(tcp_session) -> None:
    s = tcp_session
    pid = s.ping()["pid"]
    kept = s.run(lambda a: a + 1, np.ones(300_000))
    assert kept.get().sum() == 600_000.0
    assert arena_files(s) == []
    assert s._arena.segments == {}
    assert mapped_arena_segments(pid) == []


def test_the_same_checks_see_the_arena_of_an_ipc_session(make_broker) -> None:
    """The control for the test above: over ipc the same checks find the arena."""
    broker = make_broker(layout="H100-80GB:1x1g.10gb", name="ipc")
    with mig_kernel.connect(broker=broker.connection_file) as s:
        assert s.executor_endpoint.startswith("ipc://")
        pid = s.ping()["pid"]
        assert s.run(lambda a: float(a.sum()), np.ones(1000)) == 1000.0
        assert len(arena_files(s)) == 1
        assert len(mapped_arena_segments(pid)) == 1


def test_bad_input_on_the_tcp_port_is_refused_and_crashes_nothing(tcp_session) -> None:
    s = tcp_session
    pid = s.ping()["pid"]
    host, port = s.executor_endpoint.removeprefix("tcp://").split(":")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(s.executor_endpoint)
        tries = [
            ([b"garbage"], "frame"),
            ([b"", b"\x81\xa4type\xa6invoke"], "unsigned"),
            ([b"s" * 32, b"\xc1not msgpack"], "msgpack"),
            (encode("invoke", {"call_id": "x"}, os.urandom(32), sender=s.id), "bad signature"),
        ]
        for frames, reason in tries:
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no answer to {frames[:2]!r}"
            assert reason in refusal_reason(sock.recv_multipart())
    finally:
        sock.close(linger=0)
        ctx.term()
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(os.urandom(4096))  # not even ZeroMQ
    assert s.run(lambda a: float(a.sum()), np.ones(8)) == 8.0
    assert s.ping()["pid"] == pid
    status = s.broker_process.status()
    assert count(status, "leased") == 1 and count(status, "broken") == 0


def test_a_replayed_tcp_message_is_refused(tcp_session) -> None:
    s = tcp_session
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(s.executor_endpoint)
        ping = encode("ping", {}, s.key, sender=s.id)
        answers = []
        for _ in range(2):
            sock.send_multipart(ping)
            assert sock.poll(5000)
            answers.append(decode(sock.recv_multipart(), lambda _h: s.key, None))
        assert answers[0].type == "reply" and answers[0].body["pid"] == s.ping()["pid"]
        assert answers[1].type == "error" and answers[1].body["code"] == "replayed_message"
        assert answers[1].re == decode(ping, lambda _h: s.key, None).id
    finally:
        sock.close(linger=0)
        ctx.term()


def test_broker_sigkill_and_restart_readopts_tcp_executors(make_broker) -> None:
    broker = make_broker(*TCP, layout="H100-80GB:2x1g.10gb")
    with mig_kernel.connect(broker=broker.connection_file) as s:
        kept = s.run(lambda: xp.arange(5.0))  # noqa: F821
        before = executor_pids(broker.state_dir)
        endpoint = s.executor_endpoint
        broker.kill()
        broker.start()
        broker.wait_for(lambda st: count(st, "free") == 1 and count(st, "leased") == 1)
        assert executor_pids(broker.state_dir) == before  # re-adopted, not restarted
        s.refresh()
        assert s.executor_endpoint == endpoint
        np.testing.assert_array_equal(
            s.run(lambda a: a * 2, kept, to_host=True), np.arange(5.0) * 2
        )


def test_warm_pool_replaces_a_used_tcp_executor_and_rekeys_an_unused_one(make_broker) -> None:
    broker = make_broker(*TCP, layout="H100-80GB:1x1g.10gb")
    with broker.client() as c:
        lease = c.acquire()
        c.release(lease["id"])  # never used: the same executor, rekeyed
    broker.wait_for(all_free)
    first = executor_pids(broker.state_dir)
    with mig_kernel.connect(broker=broker.connection_file) as s:
        assert executor_pids(broker.state_dir) == first
        assert s.run(lambda a: a.size, np.ones(3)) == 3
        used = s.executor_endpoint
    broker.wait_for(all_free)
    assert executor_pids(broker.state_dir) != first  # used: a fresh one
    with mig_kernel.connect(broker=broker.connection_file) as s:
        assert s.executor_endpoint != used and s.executor_endpoint.startswith("tcp://")
        assert s.run(lambda: 5) == 5


def test_idle_reclaim_spills_and_restores_over_tcp(make_broker) -> None:
    broker = make_broker(
        *TCP,
        "--idle-timeout",
        "1.5",
        "--Broker.stats_interval=0.2",
        "--Broker.heartbeat_interval=0.3",
        layout="H100-80GB:2x1g.10gb",
        name="idle",
    )
    seen: list[dict] = []
    with mig_kernel.connect(broker=broker.connection_file, on_reacquire=seen.append) as s:
        kept = s.run(lambda a: a.reshape(2, 3), np.arange(6.0))
        first = s.id
        deadline = time.monotonic() + 15
        while s.ended != "idle" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.ended == "idle"
        doubled = s.run(lambda a: a * 2, kept, to_host=True)  # re-acquires and restores
        np.testing.assert_array_equal(doubled, np.arange(6.0).reshape(2, 3) * 2)
        assert s.id != first and seen and seen[0]["restored"] == 1
        assert s.executor_endpoint.startswith("tcp://")


def test_a_restart_with_the_other_transport_replaces_only_free_executors(make_broker) -> None:
    broker = make_broker("--per-user-limit", "2", layout="H100-80GB:2x1g.10gb")  # ipc
    with mig_kernel.connect(broker=broker.connection_file) as s:
        kept = s.run(lambda: xp.ones(3))  # noqa: F821
        broker.kill()  # SIGKILL: leases and executors are kept for the next start
        broker.args = [*broker.args, *TCP]
        broker.start()
        broker.wait_for(lambda st: count(st, "free") == 1 and count(st, "leased") == 1)
        with broker.client() as c:
            held = c.lease(s.id)["lease"]["executor"]["endpoint"]
            assert held.startswith("ipc://")  # in use: re-adopted as it is
            other = c.acquire()
            assert other["executor"]["endpoint"].startswith("tcp://")  # was free: replaced
            c.release(other["id"])
        np.testing.assert_array_equal(s.run(lambda a: a + 1, kept, to_host=True), np.full(3, 2.0))
    broker.wait_for(all_free)
    with broker.client() as c:
        leases = [c.acquire(), c.acquire()]
        assert [g["executor"]["endpoint"][:6] for g in leases] == ["tcp://", "tcp://"]
        for lease in leases:
            c.release(lease["id"])


def test_the_transport_option_is_a_checked_cli_flag() -> None:
    helped = run_cli("broker", "--help-all")
    assert "--executor-transport" in helped.stdout and "tcp" in helped.stdout
    bad = run_cli("broker", "--backend", "sim", "--executor-transport", "udp")
    assert bad.returncode != 0 and "udp" in (bad.stderr + bad.stdout)
