"""Whether this process can reach a broker's socket at all, asked before ZeroMQ is.

ZeroMQ's ``connect`` never fails on a local socket it cannot use: it retries in the background,
so a socket directory this user may not enter and a broker that died and left its broker.json
behind both surface seconds later as "no answer within the time limit". One plain ``AF_UNIX``
connect (closed at once; tens of microseconds) tells them apart from a broker that is merely
slow, so the client can say what is wrong and what to do. That one line is what a kernel start,
``%gpu status`` and ``mig-kernel status`` show the user.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from ..procs import pid_alive
from .connection import (
    AUTH_KEY,
    ENV_BROKER,
    SYSTEM_CONNECTION_FILE,
    ConnectionInfo,
    default_state_dir,
)
from .errors import BrokerUnavailable, MigKernelError
from .peercred import user_name

IPC_SCHEME = "ipc://"
DENIED = (errno.EACCES, errno.EPERM)
GONE = (errno.ENOENT, errno.ECONNREFUSED)


def describe_failure(exc: BaseException) -> str:
    """One line saying why something failed, for a user: a mig-kernel error's message, an
    OSError's reason and file (not its errno tuple), whitespace and newlines collapsed so it
    fits a status line, a log line or an environment variable."""
    if isinstance(exc, MigKernelError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint (None for any other transport)."""
    if not endpoint.startswith(IPC_SCHEME):
        return None
    return endpoint[len(IPC_SCHEME) :]


def check_reachable(info: ConnectionInfo, connection_file: Path) -> None:
    """Raise BrokerUnavailable naming the cause if the broker's ipc socket refuses this
    process outright: permission denied (the broker serves another user) or no listener (the
    broker is not running and ``connection_file`` is stale). Anything else, including a tcp
    endpoint, a busy broker (backlog full) or an error this check cannot interpret, is left to
    ZeroMQ and its time limit."""
    path = ipc_path(info.endpoint)
    if not path or not hasattr(socket, "AF_UNIX"):
        return
    address = "\0" + path[1:] if path.startswith("@") else path  # @name: Linux abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.setblocking(False)  # never wait: a full backlog answers EAGAIN at once
            err = probe.connect_ex(address)
    except OSError:
        return
    if err in DENIED:
        raise BrokerUnavailable(_denied_message(info, connection_file, path))
    if err in GONE:
        raise BrokerUnavailable(_not_running_message(info, connection_file, path, err))


def _described(path: Path) -> str:
    """``path (owner U, mode 0700)`` where it can be looked at, else the path alone."""
    try:
        st = path.stat()
    except OSError:
        return str(path)
    return f"{path} (owner {user_name(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o})"


def _denied_at(path: str) -> str:
    """The first directory on the way to the socket that this process may not enter, or the
    socket itself: the "X" of "permission denied on X"."""
    effective = os.access in os.supports_effective_ids
    target = Path(path)
    for directory in reversed(target.parents):
        if not os.access(directory, os.X_OK, effective_ids=effective):
            return _described(directory)
    return _described(target)


def _denied_message(info: ConnectionInfo, connection_file: Path, path: str) -> str:
    where = _denied_at(path)
    if info.auth != AUTH_KEY:  # a multi-user broker lets every user connect
        return (
            f"permission denied on {where}: the node's broker (pid {info.pid}, from "
            f"{connection_file}) should accept every user; ask your administrator to check its "
            f"runtime directory"
        )
    return (
        f"permission denied on {where}: the broker of {connection_file} (pid {info.pid}, user "
        f"{info.user or 'unknown'}) serves only its own user; ask your administrator for the "
        f"multi-user broker ({ENV_BROKER}={SYSTEM_CONNECTION_FILE}) or start your own with "
        f"`mig-kernel broker`"
    )


def _not_running_message(info: ConnectionInfo, connection_file: Path, path: str, err: int) -> str:
    seen = f"no socket at {path}" if err == errno.ENOENT else f"nothing listens on {path}"
    if pid_alive(info.pid):  # a reused pid, or a broker that is shutting down
        why = f"pid {info.pid} of {connection_file} no longer serves it"
    else:
        why = f"{connection_file} of pid {info.pid} is stale"
    return f"the broker is not running ({seen}; {why}): {_how_to_start(info, connection_file)}"


def _how_to_start(info: ConnectionInfo, connection_file: Path) -> str:
    try:
        owner = connection_file.stat().st_uid
    except OSError:
        owner = os.geteuid()
    if owner != os.geteuid():
        return f"ask {user_name(owner)} or your administrator to start it"
    command = "mig-kernel broker"
    if info.state_dir and Path(info.state_dir) != default_state_dir().resolve():
        command += f" --state-dir {info.state_dir}"
    return f"start it with `{command}`"
