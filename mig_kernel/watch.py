"""The broker's watch stream, for displays: a SUB socket on the broker's PUB, receiving each
state change (design.md's status JSON with everyone anonymized, plus ``seq``) at most every
``publish_interval``. Publications are signed with the watch key, which a client gets from the
``watch`` request along with its own pseudonym (so a display can mark the viewer's slices).

A subscriber gets no state until the next change (ZeroMQ PUB/SUB drops what came before it
connected), so ``Watcher`` starts from a ``status`` answer, which shows the viewer's own
leases in full.
"""

from __future__ import annotations

import os
from typing import Any

import zmq

from .client import BrokerClient
from .wire.errors import MigKernelError
from .wire.messages import decode

TOPIC = b"state"


class Watcher:
    def __init__(
        self,
        connection_file: str | os.PathLike[str] | None = None,
        *,
        context: zmq.Context | None = None,
    ) -> None:
        self.context = context or zmq.Context.instance()
        with BrokerClient(connection_file, context=self.context) as client:
            info = client.watch_info()
            self.initial: dict[str, Any] = client.status()
        self.pseudonym: str = info["pseudonym"]  # how this user appears to others
        self.key = bytes.fromhex(info["key"])
        self.seq = int(info["seq"])
        self.socket = self.context.socket(zmq.SUB)
        self.socket.linger = 0
        self.socket.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self.socket.connect(info["endpoint"])

    def receive(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next state (with ``mine`` set on the viewer's slices), or None after ``timeout``
        seconds without one. A publication that fails verification is skipped."""
        if not self.socket.poll(None if timeout is None else int(timeout * 1000)):
            return None
        _topic, *frames = self.socket.recv_multipart()
        try:
            msg = decode(frames, lambda _header: self.key, None)
        except MigKernelError:
            return None
        state = msg.body
        self.seq = int(state.get("seq", self.seq))
        for entry in [*state.get("slices", []), *state.get("queue", [])]:
            entry["mine"] = entry.get("holder") == self.pseudonym
        return state

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
