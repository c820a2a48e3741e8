"""The executor's end of the local lanes (wire/lane.py says what a lane is and why).

The listener is made on the first ``lane`` request, so it belongs to the uid the executor runs
as by then (the holder's, on a multi-user broker). Its abstract name is random; reaching it
is not enough: a connection must present a token offered in a signed reply, once, within
``OFFER_SECONDS``, from the executor's own uid or root.

A lane's route is a ``str`` (``"lane-3"``), a ZeroMQ route is ``bytes``: the server tells them
apart where it sends, and a message too large or a lane that broke falls back to the ZeroMQ
route of the request that opened it.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..wire import lane as wire

log = logging.getLogger("mig_kernel.executor")


@dataclass(eq=False)  # hashable by identity: the poller keys its events by it
class Lane:
    route: str
    sock: socket.socket
    zmq_route: bytes  # the ZeroMQ route of the client that opened it (the fallback)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    broken: bool = False
    reader: wire.LaneReader = field(init=False)

    def __post_init__(self) -> None:
        self.reader = wire.LaneReader(self.sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: bytes) -> bool:
        """Send a packed message; False if the lane is (now) broken: send it by ZeroMQ."""
        if self.broken:
            return False
        with self.send_lock:
            try:
                wire.send_packed(self.sock, message)
                return True
            except wire.LaneBroken as exc:
                log.warning("%s broke (%s); its replies go by ZeroMQ", self.route, exc)
                self.broken = True
                # The client reads what was sent whole, then end of stream: later messages
                # come by ZeroMQ, after everything the lane delivered.
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
                return False


class Lanes:
    def __init__(self) -> None:
        self.listener: socket.socket | None = None
        self.address = b""
        self.offers: dict[bytes, tuple[bytes, float]] = {}  # token -> (zmq route, expiry)
        self.by_route: dict[str, Lane] = {}
        self.by_fd: dict[int, Lane] = {}
        self.counter = 0

    def offer(self, zmq_route: bytes) -> tuple[bytes, bytes]:
        """(abstract address, token) for a client that asked by a signed request."""
        if self.listener is None:
            name = b"\0mig-kernel-lane-" + os.urandom(16).hex().encode()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(name)
            listener.listen(8)
            listener.setblocking(False)
            self.listener, self.address = listener, name
        now = time.monotonic()
        self.offers = {t: o for t, o in self.offers.items() if o[1] > now}
        token = os.urandom(wire.TOKEN_BYTES)
        self.offers[token] = (zmq_route, now + wire.OFFER_SECONDS)
        return self.address, token

    def accept(self) -> Lane | None:
        """A waiting connection, if it proves itself (else it is closed, and None)."""
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        try:
            uid = wire.peer_uid(sock)
            if uid not in (os.getuid(), 0):
                raise PermissionError(f"peer uid {uid} is not this executor's ({os.getuid()})")
            sock.settimeout(1.0)  # the client sends its token right after connecting
            token = sock.recv(wire.TOKEN_BYTES, socket.MSG_WAITALL)
            offer = self._take(token)
            if offer is None:
                raise PermissionError("no such lane token (or used, or expired)")
            wire.make_blocking(sock)
            sock.sendall(wire.READY)
        except (OSError, PermissionError) as exc:
            log.warning("lane connection refused: %s", exc)
            sock.close()
            return None
        self.counter += 1
        lane = Lane(f"lane-{self.counter}", sock, offer[0])
        self.by_route[lane.route] = lane
        self.by_fd[lane.fileno()] = lane
        return lane

    def _take(self, token: bytes) -> tuple[bytes, float] | None:
        now = time.monotonic()
        for offered in list(self.offers):
            if hmac.compare_digest(offered, token):
                route, expiry = self.offers.pop(offered)
                return (route, expiry) if expiry > now else None
        return None

    def drop(self, lane: Lane) -> None:
        self.by_route.pop(lane.route, None)
        self.by_fd.pop(lane.fileno(), None)
        lane.broken = True
        lane.sock.close()

    def close(self) -> None:
        for lane in list(self.by_route.values()):
            self.drop(lane)
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def sockets(self) -> list[Any]:
        return [self.listener, *self.by_route.values()] if self.listener is not None else []
