"""One signed request/reply conversation over a DEALER socket (client side).

Used for the broker and for executors alike. Not thread-safe by design: a socket belongs to one
thread at a time, so every call holds ``lock``; a thread that needs its own conversation (the
heartbeat) opens its own Channel.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from .wire.errors import (
    AuthenticationError,
    BrokerUnavailable,
    MigKernelError,
    error_from_code,
)
from .wire.messages import Message, decode, encode, refusal_reason
from .wire.transport import connect


class Channel:
    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        key: bytes,
        sender: str | None,
        *,
        timeout: float = 10.0,
        unavailable: type[MigKernelError] = BrokerUnavailable,
    ) -> None:
        self.endpoint = endpoint
        self.key = key
        self.sender = sender
        self.timeout = timeout
        self.unavailable = unavailable
        self.lock = threading.RLock()
        self.socket = context.socket(zmq.DEALER)
        self.socket.linger = 0
        connect(self.socket, endpoint)
        self.closed = False

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.socket.close(linger=0)

    def send(self, msg_type: str, body: dict[str, Any], key: bytes | None = None) -> bytes:
        msg_id = os.urandom(16)
        self.socket.send_multipart(
            encode(msg_type, body, key or self.key, sender=self.sender, msg_id=msg_id)
        )
        return msg_id

    def receive(
        self, accept: Callable[[Message], bool], deadline: float, key: bytes | None = None
    ) -> Message:
        """The next reply ``accept`` takes (others are stale answers to abandoned requests);
        an error reply is raised as its class."""
        msg = self.receive_any(accept, deadline, key)
        if msg.type == "error":
            raise error_of(msg)
        return msg

    def receive_any(
        self, accept: Callable[[Message], bool], deadline: float, key: bytes | None = None
    ) -> Message:
        """``receive``, returning error replies too (for callers that handle some codes)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(int(remaining * 1000) + 1):
                raise self.unavailable(f"no answer from {self.endpoint} within the time limit")
            frames = self.socket.recv_multipart()
            reason = refusal_reason(frames)
            if reason is not None:
                raise AuthenticationError(f"{self.endpoint} refused the request: {reason}")
            msg = decode(frames, lambda _h: key or self.key, None)
            if accept(msg):
                return msg

    def call(
        self,
        msg_type: str,
        body: dict[str, Any],
        *,
        key: bytes | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one request and return its reply body (errors are raised as their class).

        A request refused as stale (sent just before the peer restarted) is sent once more.
        """
        with self.lock:
            for attempt in range(2):
                msg_id = self.send(msg_type, body, key)
                deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
                try:
                    return self.receive(lambda m, mid=msg_id: m.re == mid, deadline, key).body
                except MigKernelError as exc:
                    if exc.code != "replayed_message" or attempt:
                        raise
            raise AssertionError("unreachable")


def error_of(msg: Message) -> MigKernelError:
    """The exception an ``error`` reply stands for (its code's class)."""
    body = msg.body
    return error_from_code(body.get("code", "error"), body.get("message", ""), body.get("details"))
