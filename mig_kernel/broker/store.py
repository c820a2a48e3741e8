"""SQLite persistence of the broker's records (state dir ``broker.sqlite``).

WAL with ``synchronous=NORMAL``: a committed transaction survives the broker being killed (not
a power cut), and a commit costs tens of microseconds. The broker commits once per loop turn,
before it sends any reply of that turn, so nothing a client was told is ever lost. A unique
index makes a second active lease on one slice impossible even if the logic above were wrong.
Heartbeat and activity times are not persisted: a restarted broker gives every lease a fresh
grace period instead.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from ..slices.model import SliceInfo
from .state import Client, Executor, Lease, Request, SliceRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slices (
    id TEXT PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, info TEXT NOT NULL,
    drained INTEGER NOT NULL DEFAULT 0, broken TEXT);
CREATE TABLE IF NOT EXISTS executors (
    id TEXT PRIMARY KEY, slice_id TEXT NOT NULL, pid INTEGER NOT NULL, start_ticks INTEGER,
    endpoint TEXT NOT NULL, control_key BLOB NOT NULL, tenant_key BLOB NOT NULL, key_lease TEXT);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY, slice_id TEXT NOT NULL, owner TEXT NOT NULL, client_id TEXT NOT NULL,
    key BLOB NOT NULL, created REAL NOT NULL, request TEXT NOT NULL, generation INTEGER NOT NULL,
    ticket TEXT NOT NULL, ended REAL, end_reason TEXT, spill TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_lease_per_slice ON leases (slice_id)
    WHERE ended IS NULL;
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, key BLOB NOT NULL, admin INTEGER NOT NULL,
    created REAL NOT NULL, uid INTEGER, groups TEXT NOT NULL DEFAULT '[]');
"""
# Columns added after a table was first created: (table, column, definition).
MIGRATIONS = (
    ("clients", "uid", "INTEGER"),
    ("clients", "groups", "TEXT NOT NULL DEFAULT '[]'"),
)


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level="DEFERRED", check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        for table, column, definition in MIGRATIONS:
            columns = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        self.db.commit()

    def commit(self) -> None:
        self.db.commit()

    def close(self) -> None:
        self.db.commit()
        self.db.close()

    # -- meta ----------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- slices --------------------------------------------------------------------------
    def load_slices(self) -> dict[str, SliceRecord]:
        rows = self.db.execute("SELECT info, drained, broken FROM slices").fetchall()
        out = {}
        for info, drained, broken in rows:
            record = SliceRecord(SliceInfo.from_json(json.loads(info)), bool(drained), broken)
            out[record.info.id] = record
        return out

    def save_slice(self, record: SliceRecord) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO slices (id, uuid, info, drained, broken) VALUES (?,?,?,?,?)",
            (
                record.info.id,
                record.info.uuid,
                json.dumps(record.info.to_json()),
                int(record.drained),
                record.broken,
            ),
        )

    def delete_slice(self, slice_id: str) -> None:
        self.db.execute("DELETE FROM slices WHERE id = ?", (slice_id,))

    # -- executors -----------------------------------------------------------------------
    def load_executors(self) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT id, slice_id, pid, start_ticks, endpoint, control_key, tenant_key, key_lease "
            "FROM executors"
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def save_executor(self, ex: Executor) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO executors (id, slice_id, pid, start_ticks, endpoint, "
            "control_key, tenant_key, key_lease) VALUES (?,?,?,?,?,?,?,?)",
            (
                ex.id,
                ex.slice_id,
                ex.pid,
                ex.start_ticks,
                ex.endpoint,
                ex.control_key,
                ex.tenant_key,
                ex.key_lease,
            ),
        )

    def delete_executor(self, executor_id: str) -> None:
        self.db.execute("DELETE FROM executors WHERE id = ?", (executor_id,))

    # -- leases --------------------------------------------------------------------------
    def insert_lease(self, lease: Lease) -> None:
        self.db.execute(
            "INSERT INTO leases (id, slice_id, owner, client_id, key, created, request, "
            "generation, ticket) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                lease.id,
                lease.slice_id,
                lease.owner,
                lease.client_id,
                lease.key,
                lease.created,
                json.dumps(lease.request.to_json()),
                lease.generation,
                lease.request_ticket,
            ),
        )

    def update_lease_generation(self, lease: Lease) -> None:
        self.db.execute(
            "UPDATE leases SET generation = ? WHERE id = ?", (lease.generation, lease.id)
        )

    def end_lease(self, lease_id: str, reason: str, when: float | None = None) -> None:
        self.db.execute(
            "UPDATE leases SET ended = ?, end_reason = ? WHERE id = ? AND ended IS NULL",
            (time.time() if when is None else when, reason, lease_id),
        )

    def load_active_leases(self, now: float) -> dict[str, Lease]:
        rows = self.db.execute(
            "SELECT id, slice_id, owner, client_id, key, created, request, generation, ticket "
            "FROM leases WHERE ended IS NULL"
        ).fetchall()
        out = {}
        for lid, sid, owner, cid, key, created, request, generation, ticket in rows:
            req = Request(**json.loads(request))
            out[lid] = Lease(lid, sid, owner, cid, key, created, req, now, now, generation, ticket)
        return out

    def ended_lease(self, lease_id: str) -> tuple[str, str, float] | None:
        """(owner, end_reason, ended) of an ended lease, None if unknown or still active."""
        row = self.db.execute(
            "SELECT owner, end_reason, ended FROM leases WHERE id = ? AND ended IS NOT NULL",
            (lease_id,),
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def set_spill(self, lease_id: str, path: str | None) -> None:
        self.db.execute("UPDATE leases SET spill = ? WHERE id = ?", (path, lease_id))

    def spill_of(self, lease_id: str, owner: str) -> str | None:
        """The spill directory of an ended lease of ``owner`` (None: none, or not theirs)."""
        row = self.db.execute(
            "SELECT spill FROM leases WHERE id = ? AND owner = ? AND ended IS NOT NULL",
            (lease_id, owner),
        ).fetchone()
        return row[0] if row and row[0] else None

    def take_spill(self, lease_id: str, owner: str) -> str | None:
        """The spill directory of an ended lease of ``owner``, once (it is then forgotten)."""
        path = self.spill_of(lease_id, owner)
        if path is not None:
            self.set_spill(lease_id, None)
        return path

    def insert_ended_lease(
        self, lease_id: str, slice_id: str, owner: str, reason: str, spill: str | None
    ) -> None:
        """Record a lease this database had lost (it was rebuilt after corruption) as ended,
        with the device data its executor saved, so its owner can still restore it."""
        now = time.time()
        self.db.execute(
            "INSERT OR IGNORE INTO leases (id, slice_id, owner, client_id, key, created, "
            "request, generation, ticket, ended, end_reason, spill) "
            "VALUES (?,?,?,'',x'',?,'{}',0,'',?,?,?)",
            (lease_id, slice_id, owner, now, now, reason, spill),
        )
        self.end_lease(lease_id, reason, now)
        if spill is not None:
            self.set_spill(lease_id, spill)

    def count_leases(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM leases").fetchone()[0]

    def prune_history(self, keep: int) -> None:
        """Forget the oldest ended leases beyond ``keep`` (the history is for people, bounded)."""
        self.db.execute(
            "DELETE FROM leases WHERE ended IS NOT NULL AND id NOT IN "
            "(SELECT id FROM leases WHERE ended IS NOT NULL ORDER BY ended DESC LIMIT ?)",
            (keep,),
        )

    # -- clients -------------------------------------------------------------------------
    def insert_client(self, client: Client) -> None:
        self.db.execute(
            "INSERT INTO clients (id, user, key, admin, created, uid, groups) "
            "VALUES (?,?,?,?,?,?,?)",
            (
                client.id,
                client.user,
                client.key,
                int(client.admin),
                client.created,
                client.uid,
                json.dumps(list(client.groups)),
            ),
        )

    def load_clients(self) -> dict[str, Client]:
        rows = self.db.execute(
            "SELECT id, user, key, admin, created, uid, groups FROM clients"
        ).fetchall()
        return {
            r[0]: Client(r[0], r[1], r[2], bool(r[3]), r[4], r[5], tuple(json.loads(r[6])))
            for r in rows
        }

    def delete_clients(self, ids: list[str]) -> None:
        self.db.executemany("DELETE FROM clients WHERE id = ?", [(i,) for i in ids])

    def prune_clients(self, older_than: float) -> None:
        """Drop client sessions older than ``older_than`` that hold no active lease."""
        self.db.execute(
            "DELETE FROM clients WHERE created < ? AND id NOT IN "
            "(SELECT client_id FROM leases WHERE ended IS NULL)",
            (older_than,),
        )
