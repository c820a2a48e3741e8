"""HMAC-SHA256 signatures and replay protection for every message on every socket."""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time

KEY_BYTES = 32
SIGNATURE_BYTES = hashlib.sha256().digest_size


def new_key() -> bytes:
    """A fresh random signing key (per client, per lease, per executor control channel)."""
    return os.urandom(KEY_BYTES)


def sign(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def verify(key: bytes, data: bytes, signature: bytes) -> bool:
    return hmac.compare_digest(sign(key, data), signature)


class ReplayGuard:
    """Refuses a message whose id was seen in the window or whose timestamp lies outside it.

    Ids are remembered only for ``window`` seconds; older timestamps are refused outright, so
    memory stays bounded. ``not_before`` closes the gap after a restart: ids seen by the previous
    process are forgotten, so anything stamped before this process started is refused too.
    """

    def __init__(self, window: float = 30.0, not_before: float | None = None) -> None:
        self.window = window
        self.not_before = not_before if not_before is not None else time.time()
        self._seen: dict[bytes, float] = {}
        self._next_prune = 0.0

    def check(self, message_id: bytes, timestamp: float, now: float | None = None) -> str | None:
        """None if the message is fresh (and remember it), else why it is refused."""
        now = time.time() if now is None else now
        if not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp):
            return "timestamp is not a finite number"
        if timestamp < self.not_before - 1.0:
            return "message is older than this server process"
        if abs(now - timestamp) > self.window:
            return (
                f"timestamp is {now - timestamp:+.1f} s off, outside the {self.window:g} s window"
            )
        if message_id in self._seen:
            return "message id was already used"
        self._seen[message_id] = timestamp
        if now >= self._next_prune:
            self._prune(now)
        return None

    def _prune(self, now: float) -> None:
        horizon = now - self.window
        self._seen = {mid: ts for mid, ts in self._seen.items() if ts >= horizon}
        self._next_prune = now + self.window / 4
