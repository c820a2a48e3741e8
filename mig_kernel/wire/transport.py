"""The two executor transports: ``ipc`` (the default: a 0600 socket file in the broker's 0700
runtime dir, array data through the shared-memory arena) and ``tcp`` (a loopback port, array data
in the signed messages themselves).

Which one a lease uses is read from its executor's endpoint (``ipc://`` or ``tcp://``), so a
broker restarted with the other setting keeps serving the leases it re-adopted.

A tcp executor's port is reserved by the broker before the executor starts: it binds a listening
socket to ``127.0.0.1:0`` (the kernel picks a free port), passes it to the executor process
(``pass_fds``), and the executor's ROUTER takes it over with ``ZMQ_USE_FD``. So the broker knows
the endpoint the moment it spawns (it connects and queues ``ready`` at once, as for ipc, and
persists the endpoint for a re-adoption), and no other process can take the port between the
choice and the bind.
"""

from __future__ import annotations

import socket as _socket
from collections.abc import Sequence
from typing import Any

import zmq

IPC = "ipc"
TCP = "tcp"
TRANSPORTS = (IPC, TCP)
LOOPBACK = "127.0.0.1"
BULK_BYTES = 64 * 1024  # received frames at least this big stay zero-copy (memoryviews)


def transport_of(endpoint: str) -> str:
    """``ipc`` or ``tcp``, from an endpoint's scheme."""
    scheme = endpoint.partition("://")[0]
    if scheme not in TRANSPORTS:
        raise ValueError(f"unsupported executor endpoint {endpoint!r}: expected ipc:// or tcp://")
    return scheme


def reserve_tcp_port() -> tuple[_socket.socket, str]:
    """A listening loopback socket on a free port and its endpoint; the caller hands the socket
    to the executor (``pass_fds``) and closes its own copy."""
    listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        listener.bind((LOOPBACK, 0))
        listener.listen(128)
    except BaseException:
        listener.close()
        raise
    return listener, f"tcp://{LOOPBACK}:{listener.getsockname()[1]}"


def bind_reserved(socket: zmq.Socket, endpoint: str, listen_fd: int) -> None:
    """Bind ``socket`` to the port the broker reserved, taking over its listening socket."""
    socket.setsockopt(zmq.USE_FD, listen_fd)
    socket.bind(endpoint)


def connect(socket: zmq.Socket, endpoint: str) -> None:
    """Connect a client socket (to an executor, or the broker).

    Over tcp the socket never reconnects: once connected it talks to the process that held the
    port (the executor holds it for life), and if that process dies a reconnect could reach
    whoever bound the freed port next. No handshake timeout either: the executor may still be
    warming up (a replacement) when the client connects."""
    if endpoint.startswith("tcp://"):
        socket.setsockopt(zmq.RECONNECT_IVL, -1)
        socket.setsockopt(zmq.HANDSHAKE_IVL, 0)
    socket.connect(endpoint)


_SNDMORE = int(zmq.SNDMORE)


def send_frames(socket: zmq.Socket, frames: Sequence[Any], copy: bool = True) -> None:
    """``send_multipart`` without its per-frame flag arithmetic on enums and its type checks
    (they cost about as much as the sends themselves on a small message)."""
    send = socket.send
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        send(frame, _SNDMORE if i < last else 0, copy=copy)


def received(frames: Sequence[Any], keep_bulk_from: int) -> list[Any]:
    """Frames received with ``copy=False``: the envelope and small frames as bytes, the bulk
    frames (array data, from index ``keep_bulk_from`` on) as writable memoryviews over the
    ZeroMQ messages, so large arrays are never copied on the way in."""
    out: list[Any] = []
    for i, frame in enumerate(frames):
        if i >= keep_bulk_from and len(frame) >= BULK_BYTES:
            out.append(frame.buffer)
        else:
            out.append(frame.bytes)
    return out
