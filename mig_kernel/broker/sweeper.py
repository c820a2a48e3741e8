"""What processes that are gone leave behind: arena segments and socket files.

- **Arena segments** (wire/arena.py) are files in /dev/shm (or the temp dir) named
  ``mig-kernel-<uid>-p<pid>t<start ticks>-...`` by the client process that created them. A
  client that exits normally unlinks them; a SIGKILLed one cannot. A segment is swept when the
  process its name names is gone (the pid has no process, or one started at another time), the
  file belongs to the uid its name names, and it is older than ``SEGMENT_MIN_AGE`` (never a
  segment being created). Mappings stay valid after the unlink, so an executor still reading
  one is unaffected. Names without a creator (older clients) are left alone. This assumes
  clients share the broker's pid namespace, as they must for ipc anyway (SO_PEERCRED pids).
  A multi-user (root) broker sweeps every user's segments by the same rule: a segment whose
  creator lives is never touched, whoever it belongs to.
- **Executor sockets** (``E-<id>.sock`` in the runtime dir) of executors the broker no longer
  runs; the broker's own sockets are removed at a graceful stop.
- **The runtime dir itself**: a tmpfs cleaner or an operator may remove it while the broker
  runs. ``RuntimeDirWatch`` notices, recreates it with its mode and binds the broker's sockets
  again (server.py rewrites the public connection file), so replacement executors can bind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from ..procs import proc_start_ticks

log = logging.getLogger("mig_kernel.broker")
SEGMENT_NAME = re.compile(r"^mig-kernel-(\d+)-p(\d+)t(\d+)-")
EXECUTOR_SOCKET = re.compile(r"^E-[0-9a-f]+\.sock$")
SEGMENT_MIN_AGE = 2.0  # seconds (a segment's creator is alive while it creates it)


def segment_dirs() -> list[Path]:
    """Where clients put arena segments (wire/arena.py): /dev/shm and the temp dirs."""
    found: list[Path] = []
    for candidate in (Path("/dev/shm"), Path(tempfile.gettempdir()), Path("/tmp")):
        if candidate not in found and candidate.is_dir():
            found.append(candidate)
    return found


def sweep_segments(dirs: Iterable[Path], now: float | None = None) -> int:
    """Unlink arena segments whose creating client is gone; returns how many."""
    now = time.time() if now is None else now
    me = os.geteuid()
    removed = 0
    for directory in dirs:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            match = SEGMENT_NAME.match(name)
            if match is None:
                continue
            uid, pid, ticks = (int(g) for g in match.groups())
            if me not in (0, uid) or proc_start_ticks(pid) == ticks:
                continue  # another user's (a single-user broker may not), or its creator lives
            path = directory / name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                continue
            if now - st.st_ctime < SEGMENT_MIN_AGE:
                continue
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed += 1
    if removed:
        log.info("swept %d arena segment(s) of clients that are gone", removed)
    return removed


def sweep_sockets(runtime_dir: Path, live_executor_ids: Iterable[str]) -> int:
    """Unlink socket files of executors this broker does not run; returns how many."""
    live = {f"{executor_id}.sock" for executor_id in live_executor_ids}
    removed = 0
    try:
        names = os.listdir(runtime_dir)
    except OSError:
        return 0
    for name in names:
        if name in live or not EXECUTOR_SOCKET.match(name):
            continue
        path = runtime_dir / name
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
                removed += 1
    if removed:
        log.info("swept %d socket file(s) of executors that are gone", removed)
    return removed


class RuntimeDirWatch:
    """Notices that the runtime dir (or the broker's socket in it) has gone."""

    def __init__(self, runtime_dir: Path, sockets: Iterable[str]) -> None:
        self.runtime_dir = runtime_dir
        self.sockets = [runtime_dir / name for name in sockets]

    def intact(self) -> bool:
        return all(path.exists() for path in self.sockets)
