"""Hung executors: noticed by missed answers, not only by their pid.

A stopped (SIGSTOP) or wedged executor keeps its pid, so the pid check of the broker's loop
never fires. Every ``stats_interval`` the broker asks each ready executor for its stats, one
request outstanding at a time (pool.py); an executor that leaves a request unanswered for
``answer_timeout`` seconds, or whose send queue is full, counts as hung. The broker then kills
it and starts a replacement, and the lease holder learns why (the lease's ``replaced``).

A long call does not count: while the tenant's code runs, the executor's watcher thread serves
the socket (executor/server.py) and answers. Requests that legitimately keep an executor busy
(a spill, a restore, becoming its holder) have limits of their own; while one is outstanding
the executor is not judged here.
"""

from __future__ import annotations

from collections.abc import Iterable

from .pool import ExecutorPool
from .state import Executor


def unresponsive(
    pool: ExecutorPool, executors: Iterable[Executor], now: float, answer_timeout: float
) -> list[tuple[Executor, str]]:
    """The ready executors that have not answered for ``answer_timeout`` seconds, and why."""
    hung = []
    for ex in executors:
        since = ex.awaiting_since
        if (
            ex.phase == "ready"
            and ex.gone_reason is None
            and since is not None
            and now - since > answer_timeout
            and not pool.awaits_other(ex)
        ):
            why = (
                f"the executor (pid {ex.pid}) stopped answering the broker for "
                f"{now - since:.0f} s (stopped or hung)"
            )
            hung.append((ex, why))
    return hung
