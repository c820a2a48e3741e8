"""One broker per GPU: a node-wide ``flock`` per GPU uuid (simulated GPUs too).

Two brokers with different state dirs (two users' single-user brokers, or one beside the
multi-user broker) would otherwise both grant the same slice. Each broker holds an exclusive
lock on ``<lock dir>/mig-kernel-gpu-<uuid>.lock`` for every GPU it serves, for its whole life;
the kernel drops the lock when the process ends however it ends, so a SIGKILLed broker never
leaves a stale lock. The file records who holds it (pid, state dir, user), which is what a
refused broker prints.

The lock dir is shared by every user (``/run/lock``, sticky and world-writable), so files are
opened without following symlinks, and a file another user's broker created (0644) is locked
through a read-only descriptor: ``flock`` needs none more. Any local user can take such a lock
first, as they could start a broker on the GPU; the lock keeps brokers apart, it is not a
defence against local users.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from ..procs import pid_alive
from ..slices.model import GpuInfo


class GpuBusy(Exception):
    """Another broker serves a GPU this one was asked to serve."""


def default_lock_dir() -> Path:
    """``/run/lock`` where the node has it (every Linux with systemd), else ``/var/lock``, else
    the temp dir."""
    for candidate in ("/run/lock", "/var/lock"):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return Path(candidate)
    import tempfile

    return Path(tempfile.gettempdir())


def lock_path(directory: Path, gpu_uuid: str) -> Path:
    return directory / f"mig-kernel-gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', gpu_uuid)}.lock"


class GpuLocks:
    """The locks of the GPUs one broker serves, held until ``release`` or process exit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.held: dict[str, int] = {}  # gpu uuid -> descriptor

    def acquire(self, gpus: Iterable[GpuInfo], holder: dict[str, object]) -> None:
        """Lock every GPU or none; GpuBusy names the broker that serves one already."""
        try:
            for gpu in gpus:
                self._lock_one(gpu, holder)
        except BaseException:
            self.release()
            raise

    def _shared_directory(self) -> None:
        """A lock dir that does not exist yet is made as /run/lock is: every user's broker may
        create its files there (1777), and only a file's owner may remove it (sticky)."""
        if not self.directory.exists():
            old_umask = os.umask(0o022)  # its parents too: every user's broker passes them
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            finally:
                os.umask(old_umask)
            os.chmod(self.directory, 0o1777)

    def _lock_one(self, gpu: GpuInfo, holder: dict[str, object]) -> None:
        self._shared_directory()
        path = lock_path(self.directory, gpu.uuid)
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
        except PermissionError:  # created by another user's broker: read-only is enough
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError as exc:
            raise GpuBusy(f"cannot open the lock of GPU {gpu.uuid} at {path}: {exc}") from None
        with contextlib.suppress(OSError):  # readable by all (the broker's umask is 077)
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe_holder(fd)
            os.close(fd)
            raise GpuBusy(
                f"GPU {gpu.index} ({gpu.name}, {gpu.uuid}) is already served by another "
                f"mig-kernel broker ({who}); one broker per GPU: stop that one, or use it "
                f"(MIG_KERNEL_BROKER=<its state dir or runtime dir>/broker.json)"
            ) from None
        self.held[gpu.uuid] = fd
        record = json.dumps({**holder, "gpu": gpu.uuid, "since": time.time()}).encode()
        with contextlib.suppress(OSError):  # read-only: the record stays the earlier one's
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)

    def release(self) -> None:
        for fd in self.held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.held.clear()


def _describe_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        record = {}
    pid = record.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return "its pid and state dir were not recorded"
    return f"pid {pid}, user {record.get('user') or '?'}, state dir {record.get('state_dir')}"
