"""Directories the broker creates where other users may look (/run, /tmp, /var/lib).

A root broker that follows a symlink another user planted, or trusts a directory another user
created first, can be made to chmod, chown or write the wrong file. So a directory is created
with ``mkdir`` (which never follows a final symlink), then opened with ``O_NOFOLLOW |
O_DIRECTORY`` and checked *through that descriptor*: its owner must be the expected one, and
its mode is set with ``fchmod`` on the descriptor, never by path. A path that exists as a
symlink, as something other than a directory, or with a foreign owner is refused with one line
that names it and says what to do. Its parent must not let others swap the entry: not writable
by others unless sticky (as /tmp, /run/lock).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from pathlib import Path


class UnsafePath(Exception):
    """A path the broker refuses to use (symlink, foreign owner, unsafe parent)."""


def _owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_parent(path: Path) -> None:
    """Refuse a directory whose parent lets other users rename or replace entries in it."""
    parent = path.parent
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        return  # created by us just below; mkdir(parents) makes it ours
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(
            f"refusing {path}: its parent {parent} is writable by every user and not sticky, "
            f"so anyone could replace it; choose a directory under a parent only you control"
        )
    if st.st_uid not in (0, os.geteuid()) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePath(
            f"refusing {path}: its parent {parent} belongs to {_owner_name(st.st_uid)} and "
            f"others may write to it; choose another directory"
        )


def secure_dir(
    path: str | os.PathLike[str],
    mode: int = 0o700,
    *,
    uid: int | None = None,
    gid: int | None = None,
) -> Path:
    """Create (or check) the directory ``path`` with exactly ``mode``, owned by ``uid``
    (default: this process's effective uid) and, if given, group ``gid``.

    Missing parents are created (mode 0755 under umask 022 is fine: they hold nothing secret);
    the last component is created and then checked through a descriptor opened without
    following symlinks. A directory that exists with a foreign owner is refused, one owned by
    us where ``uid`` is another user is handed over (``fchown``: we created it before an
    interrupted start), and a loose or tight mode is corrected with ``fchmod``."""
    path = Path(path)
    owner = os.geteuid() if uid is None else uid
    check_parent(path)
    old_umask = os.umask(0o022)  # parents hold nothing secret; others may need to pass them
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old_umask)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)  # never follows a symlink at path; loosened below if asked
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symlink" if path.is_symlink() else "not a directory"
            raise UnsafePath(
                f"refusing {path}: it is {kind} (it may have been planted to redirect this "
                f"service's files); remove it or choose another directory"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid not in (owner, os.geteuid()):
            raise UnsafePath(
                f"refusing {path}: it belongs to {_owner_name(st.st_uid)}, not to "
                f"{_owner_name(owner)}; remove it or choose another directory"
            )
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)  # before a hand-over: afterwards it is no longer ours to chmod
        if st.st_uid != owner or (gid is not None and st.st_gid != gid):
            # ours, meant for another user (created before an interrupted start), or the group
            os.fchown(fd, owner, -1 if gid is None else gid)
    finally:
        os.close(fd)
    return path


def private_dir(path: str | os.PathLike[str]) -> Path:
    """A directory only this process's user may enter (0700)."""
    return secure_dir(path, 0o700)


def unlink_quietly(path: str | os.PathLike[str]) -> None:
    """Remove a file if it is there (a socket of a process that is gone)."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.unlink(path)
