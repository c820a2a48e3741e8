"""Faults of the node, one at a time: a full disk, a corrupt, truncated or WAL-less state
database, leftovers of killed processes, a removed runtime dir, a broker that never comes
back. Each test names the defect of issue 14 it checks (docs/reliability.md lists them)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mig_kernel
from mig_kernel.procs import pid_alive
from mig_kernel.testing import BrokerProcess, all_free, count, executor_pids, wait_until
from mig_kernel.wire import errors as E

from .support.accounts import PYTHONPATH as CHECKOUT_PATH  # this checkout, then what we import

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
SIM = ("--backend", "sim", "--sim-layout")
ALL = "--LeasePolicy.per_user_limit=all"  # the tests' one user holds several leases


def start_holder(broker: BrokerProcess) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A lease holder in its own process (tests/support/holder.py), and what it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.holder", str(broker.connection_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=CHECKOUT_PATH),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the holder process printed nothing"
    return proc, json.loads(line)


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def runtime_dir(broker: BrokerProcess) -> Path:
    info = json.loads(broker.connection_file.read_text())
    return Path(info["endpoint"].removeprefix("ipc://")).parent


def wait_dead(pids: list[int], timeout: float = 20.0) -> None:
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout, f"pids {pids} gone")


# -- defect 3: disk full -------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a disk that can be filled in a moment."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)
    return filler


def test_disk_full_degrades_and_recovers_without_losing_leases(small_disk: Path) -> None:
    """Defect 3: the first failed commit crashed the broker (and its stop killed every
    executor). Now grants are refused naming the cause, the held lease keeps working, a
    release goes through, and grants resume when space returns."""
    broker = BrokerProcess(small_disk, [*SIM, "H100-80GB:2x1g.10gb", ALL], (str(REPO),))
    broker.start()
    try:
        broker.wait_for(all_free)
        session = mig_kernel.connect(broker=broker.connection_file)
        kept = session.run(lambda: xp.arange(10))  # noqa: F821
        filler = fill(small_disk)
        with broker.client() as c, pytest.raises(E.StorageUnavailable) as refused:
            for _ in range(20):  # until a commit needs a page the disk does not have
                c.release(c.acquire(wait=False)["id"])
        assert "state storage unavailable" in str(refused.value)
        assert broker.proc is not None and broker.proc.poll() is None  # still serving
        assert session.run(lambda a: int(a.sum()), kept) == 45  # the held lease works
        assert count(broker.status(), "leased") == 1
        with broker.client() as c, pytest.raises(E.StorageUnavailable):
            c.acquire(wait=False)  # a second refusal, said at once
        filler.unlink()
        with broker.client() as c:
            lease = wait_until(lambda: _try_acquire(c), 15, "grants again after space returned")
            c.release(lease["id"])
        session.release()
        broker.wait_for(all_free)
    finally:
        broker.stop()


def _try_acquire(c: Any) -> dict[str, Any] | None:
    try:
        return c.acquire(wait=False)
    except E.StorageUnavailable:
        return None


def test_stop_while_disk_full_keeps_held_executors_and_removes_broker_json(
    small_disk: Path,
) -> None:
    """Defect 3: a stop while state cannot be written ends no lease it cannot record; the
    executor holding data stays for the next broker, and no stale broker.json is left."""
    broker = BrokerProcess(small_disk, [*SIM, "H100-80GB:2x1g.10gb", ALL], (str(REPO),))
    broker.start()
    broker.wait_for(all_free)
    session = mig_kernel.connect(broker=broker.connection_file)
    kept = session.run(lambda: xp.arange(10))  # noqa: F821
    executor = session.ping()["pid"]
    filler = fill(small_disk)
    with broker.client() as c, pytest.raises(E.StorageUnavailable):
        for _ in range(20):
            c.release(c.acquire(wait=False)["id"])
    assert broker.stop() == 0
    assert not broker.connection_file.exists()
    assert pid_alive(executor)  # its data was not thrown away for the broker's own failure
    filler.unlink()
    broker.start()
    try:
        broker.wait_for(lambda s: count(s, "leased") == 1 and count(s, "free") == 1)
        assert session.run(lambda a: int(a.sum()), kept) == 45  # re-adopted with its data
        session.release()
    finally:
        broker.stop()


def test_acquire_without_wait_against_a_dead_broker_ends(make_broker) -> None:
    """Defect 3: acquire(wait=False) without a timeout kept re-sending to a dead broker."""
    broker = make_broker(layout="H100-80GB:1g.10gb")
    client = broker.client()
    broker.kill()
    outcome: list[BaseException | None] = []

    def acquire() -> None:
        try:
            client.acquire(wait=False)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=acquire, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "acquire(wait=False) still waits for a dead broker"
    assert isinstance(outcome[0], E.BrokerUnavailable)
    assert "did not answer" in str(outcome[0])
    client.close()


# -- defect 4: corrupt, truncated, WAL-less state ------------------------------------------
def _break_database(state_dir: Path, how: str) -> None:
    db = state_dir / "broker.sqlite"
    if how == "corrupt":
        with open(db, "r+b") as f:
            f.write(os.urandom(4096))
    elif how == "truncated":
        check = sqlite3.connect(str(db))
        check.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file
        check.close()
        size = db.stat().st_size
        with open(db, "r+b") as f:
            f.truncate(size // 2)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(str(db) + suffix).unlink()


@pytest.mark.parametrize("how", ["corrupt", "truncated", "wal_lost"])
def test_broken_state_database_never_grants_a_slice_an_old_executor_still_holds(
    make_broker, how: str
) -> None:
    """Defect 4: a corrupt database stopped the broker with a traceback while old executors
    ran on; a lost WAL made it lease slices again that old executors still computed on. Now
    the broker starts, stops every executor it cannot vouch for before any grant, and the
    held lease's data is saved so its owner can restore it."""
    broker = make_broker(layout="H100-80GB:2x1g.10gb")
    holder, held = start_holder(broker)
    old = list(executor_pids(broker.state_dir).values())
    broker.kill()
    kill(holder)
    _break_database(broker.state_dir, how)
    broker.start()
    # Before the broker wrote its connection file (it answers nobody before that), every
    # executor it did not re-adopt from its database was stopped.
    broker.wait_for(all_free)
    now = set(executor_pids(broker.state_dir).values())
    assert not [p for p in old if pid_alive(p) and p not in now]  # none runs unknown
    assert not pid_alive(held["executor_pid"])  # its lease is not in the state: stopped
    if how != "wal_lost":
        assert list(broker.state_dir.glob("broker.sqlite.corrupt-*")), "kept for the operator"
        log = broker.log.read_text()
        assert log.count("is unreadable") == 1
        assert "Traceback" not in log
    with broker.client() as c:
        lease = c.acquire(restore=held["lease"])
        assert lease["restored"]["restored"] == 1, lease["restored"]  # its array came back
        assert lease["executor"]["pid"] not in old
        c.release(lease["id"])


# -- defect 8: leftovers -------------------------------------------------------------------
def _segments() -> set[str]:
    return {p.name for p in SHM.glob("mig-kernel-*")} if SHM.is_dir() else set()


def test_segments_of_a_killed_client_are_swept(make_broker) -> None:
    """Defect 8: a SIGKILLed client's arena segments stayed in /dev/shm for good."""
    broker = make_broker("--Broker.sweep_interval=0.5", layout="H100-80GB:1g.10gb")
    before = _segments()
    holder, _ = start_holder(broker)
    left = _segments() - before
    assert left, "the holder's arena segment is in /dev/shm"
    kill(holder)
    wait_until(lambda: not (left & _segments()), 20, "the dead client's segments swept")


def test_socket_files_of_gone_executors_do_not_pile_up(make_broker) -> None:
    """Defect 8: executors that died while the broker was down left their socket files, and
    a stop after a restart left those of the re-adopted executors."""
    broker = make_broker(layout="H100-80GB:3x1g.10gb")
    sockets = runtime_dir(broker)
    pids = list(executor_pids(broker.state_dir).values())
    broker.kill()
    os.kill(pids[0], signal.SIGKILL)
    broker.start()
    broker.wait_for(all_free)
    executor_sockets = [n for n in os.listdir(sockets) if n.startswith("E-")]
    assert len(executor_sockets) == 3, executor_sockets  # one per live executor
    assert broker.stop() == 0
    assert [n for n in os.listdir(sockets) if n.endswith(".sock")] == []


# -- defect 10: the runtime dir removed ----------------------------------------------------
def test_removed_runtime_dir_is_made_again(make_broker) -> None:
    """Defect 10: with the runtime dir gone, replacement executors could not bind and slices
    went broken until a restart."""
    broker = make_broker(layout="H100-80GB:2x1g.10gb")
    sockets = runtime_dir(broker)
    shutil.rmtree(sockets)
    wait_until(lambda: (sockets / "broker.sock").exists(), 10, "broker socket bound again")
    assert stat.S_IMODE(sockets.stat().st_mode) == 0o700
    session = mig_kernel.connect(broker=broker.connection_file)
    assert session.run(lambda: 41 + 1) == 42
    session.release()  # a used executor: its replacement binds in the new dir
    status = broker.wait_for(all_free)
    assert not any(s["broken_reason"] for s in status["slices"])
    assert len([n for n in os.listdir(sockets) if n.startswith("E-")]) == 2


# -- defect 11: orphaned executors ---------------------------------------------------------
def test_executors_leave_once_broker_and_holder_are_gone(make_broker) -> None:
    """Defect 11: executors of a broker that never came back ran on for good. Now one without
    broker and holder for the grace period leaves, saving its lease's data first; one whose
    holder lives stays; a broker that comes back hands the saved data to its owner."""
    broker = make_broker(
        "--Broker.orphan_grace=2",
        ALL,
        "--Broker.heartbeat_interval=0.3",
        "--Broker.stats_interval=0.3",
        layout="H100-80GB:3x1g.10gb",
    )
    holder, held = start_holder(broker)
    alive_session = mig_kernel.connect(broker=broker.connection_file)
    kept = alive_session.run(lambda: xp.arange(4))  # noqa: F821
    alive_executor = alive_session.ping()["pid"]
    time.sleep(1.5)  # heartbeats, then stats requests naming each holder
    pids = list(executor_pids(broker.state_dir).values())
    others = [p for p in pids if p != alive_executor]
    broker.kill()
    kill(holder)
    wait_dead(others, 30)
    assert pid_alive(alive_executor)  # its holder lives: it stays
    broker.start()
    broker.wait_for(lambda s: count(s, "leased") == 1 and count(s, "free") == 2)
    assert alive_session.run(lambda a: int(a.sum()), kept) == 6
    with broker.client() as c:
        assert c.heartbeat([held["lease"]])[held["lease"]]["reason"] == "orphaned"
        lease = c.acquire(restore=held["lease"])
        assert lease["restored"]["restored"] == 1, lease["restored"]
        c.release(lease["id"])
    alive_session.release()
