"""The broker's guarded state store on a database that cannot grow (SQLite's
``max_page_count``: the same "database or disk is full" a full disk gives, without root):
writes are journaled, a grant is refused and forgotten, and everything else is written once
the database can grow again. The full-disk test with a real tmpfs is in
test_reliability_faults.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mig_kernel.broker.places import BrokerStartError
from mig_kernel.broker.state import Client, Lease, Request
from mig_kernel.broker.storage_guard import GuardedStore, open_state
from mig_kernel.wire.errors import StorageUnavailable


def client(n: int) -> Client:
    return Client(f"C-{n:012x}", "ana", os.urandom(32), False, time.time(), 1000, ())


def lease() -> Lease:
    now = time.time()
    return Lease("L-000000000001", "gpu0-s0", "ana", "C-1", b"k", now, Request(), now, now)


def full(guard: GuardedStore) -> None:
    pages = guard.store.db.execute("PRAGMA page_count").fetchone()[0]
    guard.store.db.execute(f"PRAGMA max_page_count = {pages}")


def test_writes_while_full_are_kept_and_written_once_there_is_room(tmp_path: Path) -> None:
    guard = open_state(tmp_path / "broker.sqlite", retry_interval=0.0)
    full(guard)
    for n in range(300):  # enough rows to need a page the database may not have
        guard.insert_client(client(n))
        guard.commit()
    assert not guard.healthy
    assert "full" in (guard.reason or "")
    with pytest.raises(StorageUnavailable, match="state storage unavailable"):
        guard.require()
    mark = guard.mark()
    guard.insert_lease(lease())
    with pytest.raises(StorageUnavailable):
        guard.commit_grant(mark)  # a grant that cannot be written is refused ...
    assert guard.mark() == mark  # ... and forgotten: it never comes back with a recovery
    guard.store.db.execute("PRAGMA max_page_count = 1073741823")
    assert guard.commit()
    assert guard.healthy
    rows = guard.store.db.execute("SELECT COUNT(*) FROM clients").fetchone()[0]
    assert rows == 300  # every session opened meanwhile was written
    assert guard.store.db.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
    assert guard.close()


def test_a_corrupt_database_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite"
    path.write_bytes(os.urandom(8192))
    guard = open_state(path)
    assert guard.healthy
    aside = list(tmp_path.glob("broker.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].stat().st_size == 8192  # kept for the operator
    guard.close()


def test_an_unopenable_database_is_a_one_line_start_error(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "broker.sqlite"
    with pytest.raises(BrokerStartError, match="state storage unavailable"):
        open_state(path)
    assert not list(tmp_path.glob("**/*.corrupt-*"))  # nothing moved: it was not corrupt
