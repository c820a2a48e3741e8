"""Leases against a real broker process: grant, best fit, queue, quota, reclaim, warm pool."""

from __future__ import annotations

import threading
import time

import pytest

import mig_kernel
from mig_kernel.procs import pid_alive
from mig_kernel.testing import count, executor_pids, wait_until
from mig_kernel.wire import errors as E

MIXED = "H100-80GB:3g.40gb,2g.20gb,1g.10gb,1g.10gb"


def test_connect_returns_a_session_with_the_slice(make_broker) -> None:
    broker = make_broker()
    session = mig_kernel.connect(profile="1g.10gb", broker=broker.connection_file)
    try:
        assert session.profile == "1g.10gb"
        assert session.isolation == "sim"
        assert session.memory_total == 9984 * 2**20
        assert session.id.startswith("L-")
        mine = [s for s in broker.status()["slices"] if s["state"] == "leased"]
        assert len(mine) == 1 and mine[0]["id"] == session.slice["id"]
        assert session.ping()["slice"] == session.slice["id"]
    finally:
        session.release()
    broker.wait_for(lambda s: count(s, "free") == 7)


def test_status_json_has_the_contract_fields(make_broker) -> None:
    broker = make_broker(layout=MIXED)
    status = broker.status()
    assert set(status) >= {"slices", "queue"}
    assert status["queue"] == []
    for entry in status["slices"]:
        assert {
            "id",
            "uuid",
            "profile",
            "isolation",
            "memory_total",
            "memory_used",
            "state",
            "holder",
        } <= set(entry)
        assert entry["state"] in {"free", "warming", "leased", "draining", "broken"}
        assert entry["uuid"].startswith("SIM-") and entry["isolation"] == "sim"
    placements = {e["profile"]: e["placement"]["start"] for e in status["slices"]}
    assert placements["3g.40gb"] == 4 and placements["2g.20gb"] == 0


def test_best_fit_picks_the_smallest_slice_that_satisfies(make_broker) -> None:
    broker = make_broker(layout=MIXED, multi_user=True)
    with broker.client("a") as a, broker.client("b") as b, broker.client("c") as c:
        first = a.acquire(memory=5 * 2**30)
        assert first["slice"]["profile"] == "1g.10gb"
        second = b.acquire(memory=15 * 2**30)
        assert second["slice"]["profile"] == "2g.20gb"
        third = c.acquire()  # anything: the smallest free
        assert third["slice"]["profile"] == "1g.10gb"
        for client, lease in ((a, first), (b, second), (c, third)):
            client.release(lease["id"])


def test_unknown_profile_and_impossible_requests_are_named(make_broker) -> None:
    broker = make_broker(layout=MIXED)
    with broker.client() as c:
        with pytest.raises(
            E.UnknownProfileError, match=r"7g\.80gb.*offers 1g\.10gb, 2g\.20gb, 3g\.40gb"
        ):
            c.acquire("7g.80gb")
        with pytest.raises(E.NoSuchSlice, match="largest"):
            c.acquire(memory=100 * 2**30)
        with pytest.raises(E.BadRequest, match="memory"):
            c.request("acquire", memory="lots", wait=False)
        with pytest.raises(E.BadRequest, match="positive"):
            c.acquire(memory=-1)


def test_quota_double_release_and_unknown_lease(make_broker) -> None:
    broker = make_broker()
    with broker.client() as c:
        lease = c.acquire(label="~/work/first.ipynb")
        with pytest.raises(
            E.QuotaExceeded, match=r"already holds 1 of 1 .*~/work/first\.ipynb .*" + lease["id"]
        ):
            c.acquire(wait=False)
        c.release(lease["id"])
        with pytest.raises(E.LeaseEnded, match="already ended"):
            c.release(lease["id"])
        with pytest.raises(E.LeaseNotFound):
            c.release("L-doesnotexist")
    session = mig_kernel.connect(broker=broker.connection_file)
    session.release()
    with pytest.raises(E.LeaseEnded, match="already released"):
        session.release()


def test_a_request_beyond_the_limit_waits_naming_the_users_notebooks(make_broker) -> None:
    """Free slices remain, but the user holds their limit: the request queues (it does not
    fail), each answer names the notebook holding the slice, and it is granted once that
    slice is released. Another user behind it is not held up."""
    broker = make_broker(layout="H100-80GB:3x1g.10gb", multi_user=True)
    with broker.client("alice") as first, broker.client("alice") as second:
        held = first.acquire(tag="kernel:k1", label="~/demos/quickstart.ipynb")
        reasons: list[str] = []
        got: dict[str, object] = {}

        def wait() -> None:
            got["lease"] = second.acquire(
                label="~/demos/cnn.ipynb", on_queued=lambda p, n, why: reasons.append(why)
            )

        waiter = threading.Thread(target=wait)
        waiter.start()
        status = broker.wait_for(lambda s: len(s["queue"]) == 1)
        assert status["queue"][0]["holder"].startswith("user-")  # the viewer is not alice
        with broker.client("bob") as bob:  # free slices still go to others
            bob.release(bob.acquire(wait=False)["id"])
        wait_until(lambda: reasons, 10, "a queued answer")
        assert reasons[0].startswith("you hold 1 of the 1 GPU slice(s) one user may hold")
        assert (
            f"~/demos/quickstart.ipynb (1g.10gb on {held['slice']['id']}, idle 0:0" in (reasons[0])
        )
        assert "`%gpu release` in that notebook" in reasons[0]
        with broker.client("alice") as alice:
            [entry] = alice.status()["queue"]
            assert entry["mine"] and entry["waiting_for"] == "quota"
        first.release(held["id"])
        waiter.join(30)
        lease = got["lease"]
        assert isinstance(lease, dict) and lease["request"]["label"] == "~/demos/cnn.ipynb"
        second.release(lease["id"])


def test_no_capacity_without_wait(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb", multi_user=True)
    with broker.client("a") as a, broker.client("b") as b:
        lease = a.acquire()
        with pytest.raises(E.NoCapacity, match="busy"):
            b.acquire(wait=False)
        a.release(lease["id"])


def test_queue_is_fifo_with_visible_positions_and_cancellable(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb", multi_user=True)
    holder = broker.client("holder")
    lease = holder.acquire()
    granted: list[str] = []
    outcome: dict[str, object] = {}
    positions: dict[str, list[int]] = {"w1": [], "w2": [], "w3": []}
    give_up = threading.Event()

    def on_queued(name: str, position: int, length: int) -> None:
        positions[name].append(position)
        if name == "w2" and give_up.is_set():
            raise KeyboardInterrupt

    def wait(name: str) -> None:
        with broker.client(name) as c:
            try:
                got = c.acquire(on_queued=lambda p, n, _: on_queued(name, p, n), timeout=30)
            except KeyboardInterrupt:
                outcome[name] = "interrupted"
                return
            granted.append(name)
            outcome[name] = got["id"]
            time.sleep(0.2)
            c.release(got["id"])

    threads = []
    for i, name in enumerate(("w1", "w2", "w3"), 1):
        threads.append(threading.Thread(target=wait, args=(name,)))
        threads[-1].start()
        broker.wait_for(lambda s, i=i: len(s["queue"]) == i)
    status = broker.status()
    assert [q["position"] for q in status["queue"]] == [1, 2, 3]
    assert all(q["holder"].startswith("user-") and not q["mine"] for q in status["queue"])
    give_up.set()  # w2 interrupts its wait at its next keepalive: the queue shrinks
    broker.wait_for(lambda s: len(s["queue"]) == 2)
    deadline = time.monotonic() + 10
    while 2 not in positions["w3"] and time.monotonic() < deadline:
        time.sleep(0.05)  # w3 learns its new place at its next keepalive
    holder.release(lease["id"])
    for thread in threads:
        thread.join(30)
    assert granted == ["w1", "w3"] and outcome["w2"] == "interrupted"
    assert positions["w1"][0] == 1 and positions["w2"][0] == 2 and positions["w3"][0] == 3
    assert 2 in positions["w3"]  # it moved up when w2 left
    holder.close()


def test_cancel_removes_a_waiter(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb", multi_user=True)
    with broker.client("holder") as holder, broker.client("waiter") as waiter:
        lease = holder.acquire()
        with pytest.raises(E.AcquireTimeout):
            waiter.acquire(timeout=0.5)
        status = broker.wait_for(lambda s: s["queue"] == [])
        assert status["queue"] == []
        holder.release(lease["id"])


def test_interrupt_while_queued_cancels(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb", multi_user=True)
    with broker.client("holder") as holder, broker.client("waiter") as waiter:
        lease = holder.acquire()

        def interrupt(position: int, length: int, reason: str) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            waiter.acquire(on_queued=interrupt)
        assert broker.status()["queue"] == []
        holder.release(lease["id"])


def test_others_see_an_anonymized_holder_and_admin_sees_all(make_broker) -> None:
    broker = make_broker(multi_user=True)
    with (
        broker.client("alice") as alice,
        broker.client("bob") as bob,
        broker.client("admin") as admin,
    ):
        lease = alice.acquire()
        mine = next(s for s in alice.status()["slices"] if s["state"] == "leased")
        assert mine["holder"] == "alice" and mine["mine"] and mine["lease"]["id"] == lease["id"]
        theirs = next(s for s in bob.status()["slices"] if s["state"] == "leased")
        assert theirs["holder"].startswith("user-") and "alice" not in str(theirs)
        assert theirs["lease"] is None and not theirs["mine"]
        assert theirs["holder"] == alice.watch_info()["pseudonym"]  # alice's, stably
        assert theirs["holder"] != bob.watch_info()["pseudonym"]
        seen = next(s for s in admin.status()["slices"] if s["state"] == "leased")
        assert seen["holder"] == "alice"
        inspected = admin.lease(lease["id"])["lease"]  # an admin sees it, but not its key
        assert inspected["owner"] == "alice" and inspected["key"] is None
        assert inspected["executor"]["endpoint"] is None
        assert alice.lease(lease["id"])["lease"]["key"] == lease["key"]  # the holder does
        with pytest.raises(E.NotPermitted):
            bob.release(lease["id"])
        with pytest.raises(E.NotPermitted):
            bob.drain("gpu0-s1")
        admin.release(lease["id"])  # an admin may reclaim anyone's lease
        assert alice.heartbeat([lease["id"]])[lease["id"]] == {"state": "ended", "reason": "admin"}


def test_heartbeat_loss_reclaims_the_slice(make_broker) -> None:
    broker = make_broker("--Broker.heartbeat_interval=0.2", "--Broker.heartbeat_misses=2")
    with broker.client() as c:
        lease = c.acquire()  # no Session: nobody heartbeats
        broker.wait_for(lambda s: count(s, "leased") == 0, timeout=10)
        assert c.heartbeat([lease["id"]])[lease["id"]] == {
            "state": "ended",
            "reason": "holder_lost",
        }
    with broker.client() as c:
        metrics = c.metrics()
    assert 'mig_kernel_leases_reclaimed_total{reason="holder_lost"} 1.0' in metrics


def test_session_heartbeats_keep_the_lease_and_notice_reclaim(make_broker) -> None:
    broker = make_broker(
        "--Broker.heartbeat_interval=0.2",
        "--Broker.heartbeat_misses=3",
        "--Broker.idle_timeout=2",
        "--Broker.stats_interval=0.2",
    )
    session = mig_kernel.connect(broker=broker.connection_file, reacquire=False)
    time.sleep(1.2)  # six heartbeat intervals: heartbeats keep it
    assert session.ended is None
    session.ping()  # GPU work keeps it from going idle
    time.sleep(1.0)
    assert session.ended is None
    deadline = time.monotonic() + 10
    while session.ended is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session.ended == "idle"
    with pytest.raises(E.LeaseEnded, match="idle"):
        session.ping()
    session.close()


def test_warm_pool_replaces_used_executors_and_keeps_pristine_ones(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb")
    before = executor_pids(broker.state_dir)["gpu0-s0"]
    with broker.client() as c:
        lease = c.acquire()
        c.release(lease["id"])  # never used: the executor holds nothing of that tenant
    broker.wait_for(lambda s: count(s, "free") == 1)
    assert executor_pids(broker.state_dir)["gpu0-s0"] == before
    session = mig_kernel.connect(broker=broker.connection_file)
    old_key = session.key
    session.ping()  # the tenant used it: it must not serve anyone else
    session.release()
    broker.wait_for(lambda s: count(s, "free") == 1)
    after = executor_pids(broker.state_dir)["gpu0-s0"]
    assert after != before
    deadline = time.monotonic() + 5
    while pid_alive(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(before)
    with broker.client() as c:
        lease = c.acquire()
        assert bytes.fromhex(lease["key"]) != old_key
        c.release(lease["id"])


def test_released_key_no_longer_opens_the_executor(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb")
    session = mig_kernel.connect(broker=broker.connection_file)
    endpoint, key, lease_id = session.executor_endpoint, session.key, session.id
    session.release()
    broker.wait_for(lambda s: count(s, "free") == 1)
    import zmq

    from mig_kernel.channel import Channel

    channel = Channel(
        zmq.Context.instance(),
        endpoint,
        key,
        lease_id,
        timeout=1.0,
        unavailable=E.ExecutorUnavailable,
    )
    try:
        with pytest.raises((E.AuthenticationError, E.ExecutorUnavailable)):
            channel.call("ping", {})
    finally:
        channel.close()


def test_killed_executor_is_replaced_and_the_lease_kept(make_broker) -> None:
    import os
    import signal

    broker = make_broker(layout="H100-80GB:1g.10gb")
    session = mig_kernel.connect(broker=broker.connection_file)
    pid = session.ping()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            new_pid = session.ping(timeout=1)["pid"]
            break
        except E.MigKernelError:
            continue
    assert new_pid != pid
    assert session.ended is None
    session.release()


def test_drain_and_undrain(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:2x1g.10gb")
    with broker.client() as c:
        lease = c.acquire()
        leased = lease["slice"]["id"]
        c.drain(leased)
        other = next(s["id"] for s in c.status()["slices"] if s["id"] != leased)
        c.drain(other)
        broker.wait_for(lambda s: count(s, "draining") == 2)
        assert c.heartbeat([lease["id"]])[lease["id"]]["state"] == "active"  # lease runs on
        c.release(lease["id"])
        with pytest.raises(E.NoCapacity):
            c.acquire(wait=False)
        with pytest.raises(E.NoSuchSlice, match="no slice 'gpu9-s0'"):
            c.drain("gpu9-s0")
        c.undrain(leased)
        broker.wait_for(lambda s: count(s, "free") == 1)
        c.release(c.acquire(wait=False)["id"])
