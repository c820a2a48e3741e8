"""Whether a lease's executor still answers, while a client waits for a call's result.

An executor that is stopped (SIGSTOP) or wedged keeps its pid, so the pid check alone would
let a caller wait for the call's timeout plus the executor's grace, or forever without a
timeout. While a result is awaited, the client therefore sends a ``ping`` whenever the
executor has been silent for ``PROBE_AFTER`` seconds (one outstanding at a time). A running
call does not keep the executor from answering: its watcher thread serves the socket while the
tenant's code runs (executor/server.py). Silence is counted from the later of the wait's start
and the last message heard.
"""

from __future__ import annotations

import os
import time

PROBE_AFTER = 0.5  # seconds of silence after which a waiting client pings the executor
# Past a call's own timeout, the executor reports the timeout itself within a fraction of a
# second (and exits): this much more silence means it cannot (stopped or hung).
SILENT_PAST_TIMEOUT = 1.5
# Without a timeout: silence after which the wait ends with ExecutorUnavailable (the call may
# still run; waiting again is allowed). Long enough for code that holds the GIL for a while.
SILENCE_LIMIT = 30.0
PROBE_PREFIX = "probe-"  # call ids of probes (a late answer is dropped, never kept as a reply)


class SilenceWatch:
    """The probe state of one executor connection (used under the connection's lock)."""

    def __init__(self) -> None:
        self.last_heard = time.monotonic()
        self.probe: str | None = None  # call id of the outstanding ping

    def heard(self, call_id: object) -> bool:
        """Note a message from the executor; True if it answers a probe (for nobody else).
        Any message answers the question a probe asks, so the next probe may go."""
        self.last_heard = time.monotonic()
        self.probe = None
        return isinstance(call_id, str) and call_id.startswith(PROBE_PREFIX)

    def silence(self, since: float) -> float:
        return time.monotonic() - max(self.last_heard, since)

    def probe_due(self, since: float) -> str | None:
        """A fresh probe's call id if one should go now, else None."""
        if self.probe is None and self.silence(since) > PROBE_AFTER:
            self.probe = f"{PROBE_PREFIX}{os.urandom(4).hex()}"
            return self.probe
        return None

    def verdict(self, since: float, timeout: float | None) -> str | None:
        """Why the wait should end now (the executor is not answering), else None."""
        silent = self.silence(since)
        now = time.monotonic()
        if timeout is not None and now - since > timeout and silent > SILENT_PAST_TIMEOUT:
            return (
                f"no result within the call's timeout of {timeout:g} s, and the executor has "
                f"not answered for {silent:.1f} s (stopped or hung); the broker replaces an "
                "executor that stops answering"
            )
        if silent > SILENCE_LIMIT:
            return (
                f"the executor has not answered for {silent:.0f} s (stopped or hung; the call "
                "may still be running there). Wait again with result(), or release the lease: "
                "the broker replaces an executor that stops answering"
            )
        return None
