"""Client sessions expire: state stays bounded however many hellos arrive.

Every ``hello`` opens a session (a row in SQLite and an entry in memory). A session that holds
no lease and waits in no queue is dropped after ``idle_limit`` seconds without a request, and a
user's sessions beyond ``per_user`` are dropped oldest-seen first when the user opens another.
A dropped session's next request is refused as from an unknown sender; ``BrokerClient`` then
opens a new one with hello and asks again. Sessions with a lease or a queued request are never
dropped here.
"""

from __future__ import annotations

from collections.abc import Iterable

from .state import Client, Lease, Ticket


def busy_ids(leases: Iterable[Lease], queue: Iterable[Ticket]) -> set[str]:
    """Sessions that hold a lease or wait in the queue."""
    return {lease.client_id for lease in leases} | {ticket.client_id for ticket in queue}


def expired(
    clients: Iterable[Client], busy: set[str], now: float, idle_limit: float
) -> list[Client]:
    """Idle sessions older than ``idle_limit`` seconds (0: never)."""
    if idle_limit <= 0:
        return []
    return [c for c in clients if c.id not in busy and now - c.last_seen > idle_limit]


def over_limit(clients: Iterable[Client], busy: set[str], user: str, per_user: int) -> list[Client]:
    """The sessions of ``user`` to drop so that one more fits within ``per_user``."""
    mine = [c for c in clients if c.user == user]
    excess = len(mine) - (per_user - 1)
    if per_user <= 0 or excess <= 0:
        return []
    idle = sorted((c for c in mine if c.id not in busy), key=lambda c: c.last_seen)
    return idle[:excess]
