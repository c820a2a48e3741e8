"""The data plane on sim slices: invocations, arguments, results, handles, errors, output,
pipelining, call-level remoting, memory cap, timeouts and executor death."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest

import mig_kernel
from mig_kernel import ExecutorLost, RemoteArray, RemoteObject
from mig_kernel.testing import count

CAP_MESSAGE = r"^slice memory cap exceeded: cap \d+\.\d\d GiB, in use \d+\.\d\d GiB, this needs"


class NotebookError(Exception):
    """An exception type of the caller's own."""


@pytest.fixture
def session(make_broker):
    broker = make_broker(layout="H100-80GB:2x1g.10gb")
    s = mig_kernel.connect(broker=broker.connection_file)
    s.broker_process = broker  # type: ignore[attr-defined]
    yield s
    s.close()


def test_run_gives_xp_and_keeps_device_results_as_remote_arrays(session) -> None:
    def fn(x, y):
        return xp.sqrt(x) + y  # noqa: F821 (xp is the slice's array module)

    x = np.arange(10, dtype=np.float64)
    r = session.run(fn, x, 1.0)
    assert isinstance(r, RemoteArray)
    assert (r.shape, r.dtype, r.nbytes) == ((10,), np.float64, 80)
    np.testing.assert_allclose(r.get(), np.sqrt(x) + 1.0)
    again = session.run(lambda a: a * 2, r, to_host=True)
    assert isinstance(again, np.ndarray)
    np.testing.assert_allclose(again, (np.sqrt(x) + 1.0) * 2)


@pytest.mark.parametrize(
    "array",
    [
        np.array(3.5),
        np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2],
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array([True, False, True]),
        np.array([1 + 2j, 3 - 1j], dtype=np.complex64),
        np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "i4"), ("b", "f8")]),
        np.zeros((0, 3), dtype=np.float32),
        np.arange(6, dtype=">u2"),
    ],
    ids=["0-d", "strided", "fortran", "bool", "complex", "structured", "empty", "big-endian"],
)
def test_any_array_round_trips_exactly(session, array: np.ndarray) -> None:
    back = session.run(lambda a: a, array, to_host=True)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_nested_arguments_scalars_and_kwargs(session) -> None:
    def fn(data, *, scale, names):
        return {
            "total": float(sum(float(a.sum()) for a in data["arrays"]) * scale),
            "names": names,
            "n": data["n"],
        }

    data = {"arrays": [np.ones(3), np.full((2, 2), 2.0)], "n": 7}
    out = session.run(fn, data, scale=2, names=("a", "b"))
    assert out == {"total": 22.0, "names": ("a", "b"), "n": 7}


def test_to_host_and_timeout_are_options_not_kwargs(session) -> None:
    def fn(**kwargs):
        return sorted(kwargs)

    assert session.run(fn, to_host=True, timeout=30, alpha=1, beta=2) == ["alpha", "beta"]


def test_handles_move_no_data_and_are_freed_when_collected(session) -> None:
    r = session.run(lambda: xp.ones(1000))  # noqa: F821
    first = session.run(lambda a: id(a), r)
    second = session.run(lambda a: id(a), r)
    assert first == second  # the same device object both times: nothing was copied
    broker = session.broker_process

    def used() -> int:
        return next(s["memory_used"] for s in broker.status()["slices"] if s["mine"])

    broker.wait_for(lambda s: any(x["mine"] and x["memory_used"] >= 8000 for x in s["slices"]))
    del r
    gc.collect()
    session.run(lambda: None)  # frees travel with the next request
    broker.wait_for(lambda s: any(x["mine"] and x["memory_used"] == 0 for x in s["slices"]))
    assert used() == 0


def test_unpicklable_results_stay_on_the_slice_as_opaque_handles(session) -> None:
    gen = session.run(lambda: (i * i for i in range(4)))
    assert isinstance(gen, RemoteObject) and "generator" in gen.type_name
    assert session.run(lambda g: list(g), gen) == [0, 1, 4, 9]


def test_exceptions_keep_their_type_and_carry_the_remote_traceback(session) -> None:
    def fails():
        raise NotebookError("bad input on the slice")

    with pytest.raises(NotebookError, match="bad input on the slice") as info:
        session.run(fails)
    assert "fails" in info.value.remote_traceback
    with pytest.raises(ZeroDivisionError):
        session.run(lambda: 1 / 0)
    assert session.run(lambda: 42) == 42  # the executor is fine afterwards


def test_printed_output_streams_back_while_the_function_runs(session, capsys, tmp_path) -> None:
    """The function prints its second line only after this side has seen the first one (a
    file it waits for), so the test needs no timing assumptions."""
    go_on = tmp_path / "seen-first-line"

    def chatty(flag: str) -> int:
        import os
        import sys
        import time

        print("first line")
        print("to stderr", file=sys.stderr)
        deadline = time.monotonic() + 30
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)
        print("second line")
        return 1

    seen: list[str] = []

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            early = capsys.readouterr()
            seen.extend([early.out, early.err])
            if "first line" in "".join(seen):
                break
            time.sleep(0.01)
        go_on.touch()

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert session.run(chatty, str(go_on)) == 1
    watcher.join()
    rest = capsys.readouterr()
    early_out = "".join(seen[0::2])
    assert "first line" in early_out and "second line" not in early_out  # live, not at the end
    assert "second line" in rest.out and "to stderr" in rest.err + "".join(seen[1::2])


def test_submit_pipelines_and_results_come_back_in_order(session) -> None:
    def work(a, k):
        return float((a * k).sum())

    a = np.ones(1000)
    futures = [session.submit(work, a, k) for k in range(10)]
    assert [f.result() for f in futures] == [1000.0 * k for k in range(10)]
    assert all(f.done() for f in futures)


def test_call_level_put_alloc_get_free_and_launch(session) -> None:
    x = session.put(np.arange(5, dtype=np.int16))
    assert isinstance(x, RemoteArray) and x.dtype == np.int16
    np.testing.assert_array_equal(session.get(x), np.arange(5, dtype=np.int16))
    z = session.alloc((2, 3), "float32")
    np.testing.assert_array_equal(z.get(), np.zeros((2, 3), np.float32))
    session.free(z)
    with pytest.raises(RuntimeError, match="needs a GPU slice"):
        session.launch('extern "C" __global__ void k() {}', "k", (1,), (1,), ())


def test_memory_cap_is_enforced_and_the_slice_stays_usable(session) -> None:
    cap = session.memory_total

    def too_big():
        return xp.zeros(cap // 8 + 1024, dtype=np.float64)  # noqa: F821 (lazy pages, no RAM)

    with pytest.raises(MemoryError, match=CAP_MESSAGE):
        session.run(too_big)
    assert session.run(lambda: 7) == 7


def test_sim_caps_temporaries_at_the_allocation_as_a_gpu_would(session) -> None:
    """A temporary beyond the cap (never kept, so the data plane never accounts it) fails at
    its allocation, with the GPU's wording; what the slice holds counts against the room."""
    gib = 2**30

    def temporary(n: int) -> float:
        block = xp.ones(n * gib // 8)  # noqa: F821
        return float(block[::4096].sum())

    with pytest.raises(MemoryError, match=CAP_MESSAGE) as failed:
        session.run(temporary, 12)
    assert "this needs 12.00 GiB more" in str(failed.value)
    frames = [line for line in failed.value.remote_traceback.splitlines() if "File " in line]
    assert frames[-2].endswith(", in temporary") and frames[-1].endswith(", in ones")  # there
    kept = session.run(lambda: xp.ones(7 * gib // 8))  # noqa: F821
    with pytest.raises(MemoryError, match=r"in use 7\.00 GiB, this needs 4\.00 GiB more"):
        session.run(temporary, 4)
    assert session.run(temporary, 2) == 2 * gib // 8 // 4096  # fits beside the 7 GiB
    kept.free()
    assert session.run(temporary, 8) == 8 * gib // 8 // 4096


def test_timeout_kills_and_replaces_the_executor_and_reports_data_lost(session) -> None:
    kept = session.run(lambda: xp.ones(10))  # noqa: F821
    pid = session.ping()["pid"]
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="lost"):
        session.run(time.sleep, 30, timeout=0.5)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 20
    while True:  # the broker replaces the executor; the lease stays
        try:
            assert session.run(lambda: 5) == 5
            break
        except ExecutorLost:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert session.ping()["pid"] != pid
    with pytest.raises(ExecutorLost, match="gone"):
        kept.get()


def test_executor_death_is_seen_within_a_second(session) -> None:
    pid = session.ping()["pid"]
    future = session.submit(time.sleep, 30)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(ExecutorLost, match="died"):
        future.result()
    assert time.monotonic() - killed < 1.0
    broker = session.broker_process
    broker.wait_for(lambda s: count(s, "leased") == 1 and count(s, "free") == 1)


def test_a_wrong_key_cannot_invoke(session) -> None:
    from mig_kernel.remote import ExecutorConnection
    from mig_kernel.wire.arena import Arena
    from mig_kernel.wire.errors import AuthenticationError

    arena = Arena("intruder")
    conn = ExecutorConnection(
        session.broker.context,
        session.executor_endpoint,
        os.urandom(32),
        session.id,
        None,
        session.generation,
        arena,
        lambda: None,
    )
    try:
        with pytest.raises(AuthenticationError, match="bad signature"):
            conn.submit("invoke", lambda: 1, ((), {}), {}, False, 5).result(timeout=5)
    finally:
        conn.close()
        arena.close()


def test_idle_reclaim_spills_and_the_next_call_restores_handles(make_broker) -> None:
    broker = make_broker(
        "--idle-timeout",
        "1.5",
        "--Broker.stats_interval=0.2",
        "--Broker.heartbeat_interval=0.3",
        layout="H100-80GB:2x1g.10gb",
        name="idle",
    )
    seen: list[dict] = []
    session = mig_kernel.connect(broker=broker.connection_file, on_reacquire=seen.append)
    try:
        kept = session.run(lambda: xp.arange(6.0).reshape(2, 3))  # noqa: F821
        lost = session.run(lambda: (i for i in range(3)))  # cannot be written to host storage
        first_lease = session.id
        deadline = time.monotonic() + 15
        while session.ended != "idle" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session.ended == "idle"
        spilled = list((broker.state_dir / "spill").iterdir())
        assert [p.name for p in spilled] == [first_lease]
        doubled = session.run(lambda a: a * 2, kept, to_host=True)  # re-acquires, restores
        np.testing.assert_array_equal(doubled, np.arange(6.0).reshape(2, 3) * 2)
        np.testing.assert_array_equal(kept.get(), np.arange(6.0).reshape(2, 3))
        assert session.id != first_lease
        assert seen and seen[0]["previous_lease"] == first_lease and seen[0]["restored"] == 1
        with pytest.raises(KeyError, match="not on this executor"):
            session.run(lambda g: list(g), lost)
        assert not (broker.state_dir / "spill" / first_lease).exists()  # consumed
    finally:
        session.close()


def test_malformed_invocations_get_clear_errors(session) -> None:
    from mig_kernel.wire.errors import BadRequest

    conn = session._connection()
    with pytest.raises(BadRequest, match="two frames"):
        conn._call("invoke", {"timeout": None})
    with pytest.raises(BadRequest, match="timeout must be a positive"):
        conn._call("invoke", {"timeout": -1})
    with pytest.raises(BadRequest, match="unknown call"):
        conn._call("call", {"op": "format_disk"})
    with pytest.raises(BadRequest, match="fetch needs items"):
        conn._call("fetch", {"items": "all"})
    assert session.run(lambda: 3) == 3


def test_results_needing_cloudpickle_keep_one_handle_per_array(session) -> None:
    def fn():
        a = xp.ones(1000)  # noqa: F821
        return a, a, (lambda: 1)  # the lambda forces the by-value pickler

    first, second, func = session.run(fn)
    assert first is second and func() == 1  # one handle, one RemoteArray: freed once
    broker = session.broker_process
    broker.wait_for(lambda s: any(x["mine"] and x["memory_used"] == 8000 for x in s["slices"]))
