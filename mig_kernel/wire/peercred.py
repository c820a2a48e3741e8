"""Who is on the other end of an ipc socket, as the kernel says (SO_PEERCRED).

libzmq reads ``SO_PEERCRED`` when it accepts a Unix-socket connection and appends
``:uid:gid:pid`` to the connection's peer address, which every message received on it carries
as the ``Peer-Address`` metadata property (``zmq_msg_gets``). The values are those of the
process that called ``connect()``, fixed for the connection's life, and cannot be claimed or
forged by the peer: the same fact MUNGE, D-Bus and systemd authenticate by.
"""

from __future__ import annotations

import pwd
import re
from dataclasses import dataclass

import zmq

_CREDENTIALS = re.compile(r":(\d+):(\d+):(\d+)$")


@dataclass(frozen=True)
class PeerCredentials:
    uid: int
    gid: int
    pid: int


def peer_credentials(frame: zmq.Frame) -> PeerCredentials | None:
    """The credentials of the connection ``frame`` arrived on (None: not an ipc connection,
    or a libzmq built without SO_PEERCRED)."""
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return None
    if isinstance(address, bytes):
        address = address.decode(errors="replace")
    match = _CREDENTIALS.search(address or "")
    if match is None:
        return None
    uid, gid, pid = (int(group) for group in match.groups())
    return PeerCredentials(uid, gid, pid)


def user_name(uid: int) -> str:
    """The login name of ``uid``, or ``uid N`` where the node has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
