"""An executor of a multi-user broker becomes its lease holder, for good, before the holder's
first request.

The broker (root, or a service user with CAP_SETUID/CAP_SETGID/CAP_CHOWN) starts executors and
lets them warm up (CUDA context, a first kernel) under its own uid; at the grant it sends
``become`` with the holder's account, and the executor:
1. hands its socket file to the holder (owner the holder, group the broker's, 0660: the holder
   connects, the broker keeps its connection);
2. sets the holder's supplementary groups, then gid, then uid, all three ids of each
   (``setresgid``/``setresuid``), so there is no saved id to switch back to; glibc applies the
   change to every thread of the process (the CUDA driver's too);
3. empties every capability set (a service user's capabilities survive a switch between two
   non-root uids), sets ``no_new_privs`` (no setuid binary can give rights back) and checks
   that no capability is left;
4. takes the holder's HOME, USER, LOGNAME, a private umask and the home as working directory.
Any step that fails is an error, and the broker kills the executor rather than grant it.
"""

from __future__ import annotations

import ctypes
import os

from ..procs import capabilities
from ..wire.executor_spec import Account

PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(Exception):
    """The executor could not become its holder (it must then never serve them)."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_capabilities() -> None:
    """Empty the ambient, effective, permitted and inheritable sets. A switch from root to
    another uid clears them by itself; a switch from a service user that holds capabilities
    (CAP_SETUID...) to another non-root uid does not."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # absent on old kernels: ok
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capset failed: {os.strerror(ctypes.get_errno())}")


def _no_new_privs() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise PrivilegeError(f"prctl(NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}")


def become(holder: Account, socket_path: str | None) -> None:
    """Switch this process to ``holder`` irreversibly (see the module docstring)."""
    broker_gid = os.getegid()
    try:
        if socket_path is not None:
            os.chmod(socket_path, 0o660)  # while it is still ours to chmod
            os.chown(socket_path, holder.uid, broker_gid)
        os.setgroups(list(holder.groups))
        os.setresgid(holder.gid, holder.gid, holder.gid)
        os.setresuid(holder.uid, holder.uid, holder.uid)
    except OSError as exc:
        raise PrivilegeError(
            f"cannot switch to user {holder.user!r} (uid {holder.uid}): {exc.strerror}; the "
            f"broker must run as root or hold CAP_SETUID, CAP_SETGID, CAP_CHOWN and CAP_KILL"
        ) from None
    if holder.uid != 0:
        _drop_capabilities()
    _no_new_privs()
    if os.getresuid() != (holder.uid,) * 3 or os.getresgid() != (holder.gid,) * 3:
        raise PrivilegeError(f"the switch to uid {holder.uid} did not take on every id")
    if holder.uid != 0:
        left = {name: mask for name, mask in capabilities().items() if name != "CapBnd" and mask}
        if left:
            raise PrivilegeError(f"capabilities left after the switch: {left}")
    os.umask(0o077)
    os.environ.update(HOME=holder.home, USER=holder.user, LOGNAME=holder.user)
    try:
        os.chdir(holder.home)
    except OSError:
        os.chdir("/")  # a user without a (reachable) home still computes
