"""The broker's state storage when the disk fills up or fails: degrade, never crash.

``GuardedStore`` stands in front of ``Store``. Every write is also kept in a journal of the
changes since the last successful commit. While SQLite works, the journal is cleared at each
commit and nothing changes. When a write or a commit fails (``database or disk is full``, an
I/O error, a database that went bad), the transaction is rolled back, the broker is told
(``healthy`` is False, ``reason`` says why) and carries on from its records in memory: it keeps
serving existing leases, releases, heartbeats and status, and refuses new grants with
"state storage unavailable: <reason>" (a grant is the one thing it must never promise without
having written it). Every ``retry_interval`` the commit tries again by replaying the journal; once
that works the broker is back to normal and nothing it did meanwhile is lost.

Grants go through ``commit_grant``: their writes are committed at once, and if that fails they
are taken out of the journal again, so a refused grant can never reappear after a recovery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..wire.errors import StorageUnavailable
from .store import Store

log = logging.getLogger("mig_kernel.broker")

# Store methods that change the database; every other public method only reads.
WRITES = frozenset(
    {
        "set_meta",
        "save_slice",
        "delete_slice",
        "save_executor",
        "delete_executor",
        "insert_lease",
        "insert_ended_lease",
        "update_lease_generation",
        "end_lease",
        "set_spill",
        "prune_history",
        "insert_client",
        "prune_clients",
    }
)
JOURNAL_LIMIT = 20000  # changes kept while degraded; beyond it new sessions are refused


class GuardedStore:
    def __init__(self, store: Store, retry_interval: float = 1.0) -> None:
        self.store = store
        self.retry_interval = retry_interval
        self.journal: list[tuple[str, tuple[Any, ...]]] = []
        self.reason: str | None = None  # why storage is unavailable; None while it works
        self.failed_at = 0.0
        self._next_retry = 0.0
        self._spills: dict[str, str | None] = {}  # set_spill while degraded (reads see them)

    @property
    def healthy(self) -> bool:
        return self.reason is None

    def unavailable(self) -> StorageUnavailable:
        return StorageUnavailable(
            f"state storage unavailable: {self.reason}; existing leases keep working, new "
            f"ones are granted once the broker can write its state again"
        )

    def require(self, room: int = 0) -> None:
        """Raise StorageUnavailable unless writes can be promised now."""
        if not self.healthy and (room == 0 or len(self.journal) + room > JOURNAL_LIMIT):
            raise self.unavailable()

    # -- reads and writes ----------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if name in WRITES:
            return lambda *args: self._write(name, args)
        if callable(attr) and not name.startswith("_"):
            return lambda *args, **kwargs: self._read(attr, *args, **kwargs)
        return attr

    def _read(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            self._fail(exc)
            raise self.unavailable() from None

    def _write(self, name: str, args: tuple[Any, ...]) -> None:
        self.journal.append((name, args))
        if name == "set_spill":
            self._spills[args[0]] = args[1]
        if not self.healthy:
            return  # replayed once storage works again
        try:
            getattr(self.store, name)(*args)
        except sqlite3.Error as exc:
            self._fail(exc)

    def take_spill(self, lease_id: str, owner: str) -> str | None:
        """Store.take_spill through the journal: a spill taken (or discarded) while degraded
        stays taken. A spill written while degraded can be restored once storage works."""
        if lease_id in self._spills and self._spills[lease_id] is None:
            return None
        path = self._read(self.store.spill_of, lease_id, owner)
        if path:
            self._write("set_spill", (lease_id, None))
        return path

    # -- commits -------------------------------------------------------------------------
    def commit(self) -> bool:
        """Commit (or, while degraded and due, replay the journal); True if storage works."""
        if self.healthy:
            try:
                self.store.commit()
            except sqlite3.Error as exc:
                self._fail(exc)
                return False
            self.journal.clear()
            self._spills.clear()
            return True
        if time.monotonic() >= self._next_retry:
            self._replay()
        return self.healthy

    def flush(self) -> bool:
        """Commit now, retrying at once if degraded (a stop); True if storage works."""
        if not self.healthy:
            self._replay()
        return self.commit()

    def commit_grant(self, mark: int) -> None:
        """Commit a grant's writes (journal entries from ``mark`` on) now; if that fails they
        are dropped from the journal and StorageUnavailable is raised."""
        if self.commit():
            return
        del self.journal[mark:]
        raise self.unavailable()

    def mark(self) -> int:
        return len(self.journal)

    def _replay(self) -> None:
        self._rollback()
        try:
            for name, args in self.journal:
                getattr(self.store, name)(*args)
            self.store.commit()
        except sqlite3.Error as exc:
            self._rollback()
            self.reason = _describe(exc)
            self._next_retry = time.monotonic() + self.retry_interval
            return
        log.warning(
            "state storage works again after %.0f s (%d change(s) written); granting again",
            time.time() - self.failed_at,
            len(self.journal),
        )
        self.reason = None
        self.journal.clear()
        self._spills.clear()

    def _fail(self, exc: sqlite3.Error) -> None:
        self._rollback()
        if self.reason is None:
            self.failed_at = time.time()
            log.error(
                "state storage unavailable: %s; serving existing leases, refusing new grants "
                "until it can be written again",
                _describe(exc),
            )
        self.reason = _describe(exc)
        self._next_retry = time.monotonic() + self.retry_interval

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.store.db.rollback()

    def close(self) -> bool:
        """Write what is pending and close; False (and the database left as it was on disk)
        when storage still fails."""
        ok = self.flush()
        with contextlib.suppress(sqlite3.Error):
            self.store.db.close()
        return ok


def _describe(exc: sqlite3.Error) -> str:
    return str(exc) or type(exc).__name__


def open_state(path: Path, retry_interval: float = 1.0) -> GuardedStore:
    """The broker's state database, checked before use. One that SQLite cannot read (not a
    database, truncated, malformed pages) is moved aside, kept for the operator, and a fresh
    one started: the executors the lost database knew are found again through the executor
    registry (registry.py). A database that cannot be opened for another reason (a full or
    failing disk) stops the start with one line."""
    from .places import BrokerStartError

    try:
        store = _open_checked(path)
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and not _corrupt(exc):
            raise BrokerStartError(f"state storage unavailable: {path}: {exc}") from None
        aside = _move_aside(path)
        log.error(
            "state database %s is unreadable (%s): moved to %s; starting with a fresh one",
            path,
            _describe(exc),
            aside,
        )
        try:
            store = _open_checked(path)
        except sqlite3.Error as again:
            raise BrokerStartError(f"state storage unavailable: {path}: {again}") from None
    return GuardedStore(store, retry_interval)


def _open_checked(path: Path) -> Store:
    store = Store(path)
    try:
        result = [row[0] for row in store.db.execute("PRAGMA quick_check")]
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):
            store.db.close()
        raise
    if result != ["ok"]:
        store.db.close()
        raise sqlite3.DatabaseError("; ".join(str(r) for r in result[:3]))
    return store


def _corrupt(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("malformed", "not a database", "corrupt"))


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(path) + suffix)
        if source.exists():
            os.replace(source, Path(str(aside) + suffix))
    return aside
