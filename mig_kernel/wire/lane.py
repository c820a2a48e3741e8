"""The local lane: a lease holder's direct stream to its executor, beside the ZeroMQ socket.

Why: an empty call over the signed ZeroMQ path costs two ZeroMQ hops (each through libzmq's
I/O thread in both processes, so four thread wake-ups per round trip), msgpack and an
HMAC-SHA256 each way, and the replay guard. A connected Unix stream socket between the two
processes has none of that: the kernel says who is at the other end (``SO_PEERCRED``) and
nobody else can write into it, so its messages need no signature, no timestamp and no replay
check.

How a lane is opened (client in remote.py, executor in executor/lanes.py):

1. the client sends a signed ``lane`` request over the ZeroMQ socket (ipc executors only: the
   socket file is 0600 in a private directory, so only the holder reaches it). The reply names
   an abstract Unix socket the executor listens on and carries a fresh one-time token of 32
   random bytes;
2. the client connects and sends the token; the executor accepts the connection only if the
   token is one it offered in the last ``OFFER_SECONDS`` (each is used once) and the peer's
   uid (``SO_PEERCRED``) is its own (the holder's, after a multi-user executor became it) or
   root's, then answers ``READY``.

From then on every request of that client goes through the lane, and every reply, output
stream and error for it comes back through it. A lane lives as long as its executor, which
serves one lease (a multi-user broker retires every executor after its lease; a single-user
one reuses only executors no tenant touched, and opening a lane is a tenant request).

A message is ``[8-byte big-endian length][pickle of (type, body, payload frames)]``. Pickle,
not msgpack: both ends already unpickle each other's data (functions, arguments, results).
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

TOKEN_BYTES = 32
OFFER_SECONDS = 10.0  # an offered token not used within this is forgotten
READY = b"\x01"  # the executor's answer to a valid token
_LENGTH = struct.Struct("!Q")
HEADER_BYTES = _LENGTH.size
MAX_MESSAGE = 1 << 30  # a length beyond this is a broken stream, not a message
SEND_TIMEOUT = 5.0  # seconds a blocked send waits for the peer to read before the lane breaks
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_WAITALL = int(socket.MSG_WAITALL)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


class LaneBroken(OSError):
    """The lane cannot carry messages any more (peer gone, stream cut, peer not reading)."""


def pack(kind: str, body: dict[str, Any], payload: Any = ()) -> bytes:
    frames = tuple(bytes(f) if isinstance(f, memoryview) else f for f in payload) if payload else ()
    data = pickle.dumps((kind, body, frames), protocol=_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


# The round trip a waiting client rehearses (remote.py ``_rehearse``): fixed bytes both ways, so
# that the executor, waiting for a call's GPU work, answers it without taking it apart
# (``answer_echo``); outside such a wait it is an ordinary request. Its id is a liveness
# probe's (liveness.PROBE_PREFIX): the client drops the answer as it drops a late probe's.
ECHO_ID = "probe-echo"
ECHO = pack("echo", {"call_id": ECHO_ID})
ECHO_REPLY = pack("reply", {"call_id": ECHO_ID})


def answer_echo(sock: socket.socket, send: Callable[[bytes], Any]) -> bool | None:
    """If the next bytes on ``sock`` are an ``ECHO``, take them and ``send`` ``ECHO_REPLY``
    (True); else read nothing (a peek: the receive's path is rehearsed all the same): None if
    nothing has come, False if something else has (a request, or a part of one: the usual
    path's to serve). Never waits. The caller is the lane's only reader for now and has none
    of its bytes buffered."""
    try:
        head = sock.recv(len(ECHO), _PEEK)
    except OSError:  # BlockingIOError: nothing has come (the usual case)
        return None
    if head != ECHO:
        return False if head else None  # (b"": end of stream, for the usual path to find)
    sock.recv(len(ECHO))  # the echo itself, there already
    send(ECHO_REPLY)  # (a lane that broke sends by ZeroMQ no more: the echo needs no answer)
    return True


def send_packed(sock: socket.socket, message: bytes) -> None:
    """Send a whole packed message (``make_blocking``: a peer that reads nothing for
    ``SEND_TIMEOUT`` breaks the lane)."""
    try:
        sock.sendall(message)
    except OSError as exc:  # timeout included: a peer that does not read breaks the lane
        raise LaneBroken(f"lane send failed: {exc}") from None


def _exactly(sock: socket.socket, nbytes: int, first: bytes = b"") -> bytes:
    if not first:  # the usual case: one call (the sender wrote the message whole)
        try:
            data: bytes | None = sock.recv(nbytes, _WAITALL)
        except BlockingIOError:  # a receive timeout: nothing yet
            data = None
        except OSError as exc:
            raise LaneBroken(f"lane receive failed: {exc}") from None
        if data is not None:
            if len(data) == nbytes:
                return data
            if not data:
                raise LaneBroken("the lane was closed by its peer")
            first = data
    buffer = bytearray(first)
    while len(buffer) < nbytes:
        try:
            chunk = sock.recv(nbytes - len(buffer))
        except BlockingIOError:  # a receive timeout (the client's) within a message: wait on
            continue
        except OSError as exc:
            raise LaneBroken(f"lane receive failed: {exc}") from None
        if not chunk:
            raise LaneBroken("the lane was closed by its peer")
        buffer += chunk
    return bytes(buffer)


def receive(sock: socket.socket, head: bytes = b"") -> tuple[str, dict[str, Any], tuple[Any, ...]]:
    """The next whole message (``head``: its first bytes, already read by a non-blocking
    probe). Blocks until it is complete; raises LaneBroken at end of stream or on garbage."""
    header = _exactly(sock, HEADER_BYTES, head)
    (length,) = _LENGTH.unpack(header)
    if length > MAX_MESSAGE:
        raise LaneBroken(f"lane message of {length} bytes: the stream is broken")
    return _load(_exactly(sock, length))


class LaneReader:
    """Whole messages from one end of a lane, usually with a single ``recv`` each.

    ``receive`` takes two (the length, then the message); on a VM a system call costs a few
    microseconds, a tenth of a short call's whole budget. This reads what is there, up to
    ``CHUNK`` bytes, and keeps what follows the first message for the next ``next``; the rest
    of a message larger than that is read at once (the sender writes messages whole).

    A caller that waits on the socket (a poll) must first take every message already read
    (``buffered``): the socket shows nothing more for them."""

    CHUNK = 1 << 16

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rest = b""  # bytes read past the last whole message
        self.last: Any = b""  # the latest message read whole in one chunk, header and all

    def buffered(self) -> bool:
        """Whether a whole message was read already (``next`` returns it without a call)."""
        rest = self.rest
        return (
            len(rest) >= HEADER_BYTES and len(rest) >= HEADER_BYTES + _LENGTH.unpack_from(rest)[0]
        )

    def next(self, wait: bool = True) -> tuple[str, dict[str, Any], tuple[Any, ...]] | None:
        """The next message; without ``wait``, None when nothing has come (a message that has
        begun to come is waited for). Raises LaneBroken at end of stream or on garbage."""
        data = self.rest
        if not data or not self.buffered():  # (the usual case, nothing left over, first)
            try:
                chunk = self.sock.recv(self.CHUNK, 0 if wait else _DONTWAIT)
            except BlockingIOError:
                return None
            except OSError as exc:
                raise LaneBroken(f"lane receive failed: {exc}") from None
            if not chunk:
                raise LaneBroken("the lane was closed by its peer")
            data = data + chunk if data else chunk
            if len(data) < HEADER_BYTES:
                data = _exactly(self.sock, HEADER_BYTES - len(data), data)
        (length,) = _LENGTH.unpack_from(data)
        if length > MAX_MESSAGE:
            raise LaneBroken(f"lane message of {length} bytes: the stream is broken")
        end = HEADER_BYTES + length
        if len(data) < end:  # the rest of a large message: straight into its buffer
            message = bytearray(length)
            view = memoryview(message)
            have = len(data) - HEADER_BYTES
            view[:have] = memoryview(data)[HEADER_BYTES:]
            _fill(self.sock, view[have:])
            self.rest = b""
        else:
            whole = memoryview(data)[:end]
            message = whole[HEADER_BYTES:]
            self.rest = data[end:]
            self.last = whole
        return _load(message)


def whole_message(data: bytes) -> tuple[str, dict[str, Any], tuple[Any, ...]] | None:
    """``data`` read, taken apart if it is exactly one whole message (what one ``recv`` of a
    reply usually reads), else None: a part of one, or more than one, is ``LaneReader``'s to
    take (its ``rest``). Raises LaneBroken on garbage."""
    if len(data) < HEADER_BYTES or HEADER_BYTES + _LENGTH.unpack_from(data)[0] != len(data):
        return None
    return _load(memoryview(data)[HEADER_BYTES:])


def _fill(sock: socket.socket, view: memoryview) -> None:
    while view:
        try:
            got = sock.recv_into(view, len(view), _WAITALL)
        except BlockingIOError:  # a receive timeout (the client's) within a message: wait on
            continue
        except OSError as exc:
            raise LaneBroken(f"lane receive failed: {exc}") from None
        if not got:
            raise LaneBroken("the lane was closed by its peer")
        view = view[got:]


def _load(data: Any) -> tuple[str, dict[str, Any], tuple[Any, ...]]:
    try:
        kind, body, payload = pickle.loads(data)
    except Exception as exc:
        raise LaneBroken(f"unreadable lane message: {exc}") from None
    if not isinstance(kind, str) or not isinstance(body, dict):
        raise LaneBroken("a lane message is (type, body, payload)")
    return kind, body, payload


def replace_at(
    argv: tuple[tuple[Any, ...], dict[str, Any]],
    positions: list[int | str],
    replace: Callable[[Any], Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A request's (args, kwargs) with the values at ``positions`` (indexes into args,
    keywords; the ``handles`` field) replaced: handle numbers by what they name (executor),
    or by markers that pickle as handles (a client's ZeroMQ fallback)."""
    args, kwargs = list(argv[0]), dict(argv[1])
    for at in positions:
        if type(at) is int:
            args[at] = replace(args[at])
        else:
            kwargs[at] = replace(kwargs[at])
    return tuple(args), kwargs


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def make_blocking(sock: socket.socket) -> None:
    """Blocking, with the send timeout in the kernel (``SO_SNDTIMEO``): a Python-level timeout
    would poll before every receive, and a non-blocking probe (``MSG_DONTWAIT``) must not wait."""
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT), 0))


def receive_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking receive that finds nothing returns after ``seconds`` (``BlockingIOError``;
    ``LaneReader.next`` returns None), in the kernel: no poll before each receive."""
    whole = int(seconds)
    sock.setsockopt(
        socket.SOL_SOCKET,
        socket.SO_RCVTIMEO,
        struct.pack("ll", whole, int((seconds - whole) * 1e6)),
    )


def connect(address: bytes, token: bytes, timeout: float = 5.0) -> socket.socket:
    """The client's half of the opening: connect, present the token, wait for ``READY``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(token)
        answer = sock.recv(1)
        if answer != READY:
            raise LaneBroken("the executor refused the lane")
        make_blocking(sock)
        return sock
    except BaseException:
        sock.close()
        raise
