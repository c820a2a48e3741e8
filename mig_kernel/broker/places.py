"""Where a broker keeps its files, and the locks that keep other brokers away from them.

- the state dir (0700): SQLite with every key, logs, ``broker.lock`` (one broker per state
  dir); files the broker makes are 0600 (its umask is 077);
- the runtime dir of its sockets: private (0700) for a single-user broker, derived from the
  state dir so a restarted broker finds its executors; public (0755, ``/run/mig-kernel``) for a
  multi-user one, whose sockets say who connects (SO_PEERCRED);
- the spill dir: ``<state>/spill`` (single-user), or ``<state>-spill`` (0711) with one 0700
  directory per user owned by that user, since a multi-user broker's executors write there as
  their holder;
- the per-GPU locks (gpu_lock.py) and the connection file (0600 with the hello key, or public).

Every directory is made and checked by wire/paths.py: no symlink followed, no foreign owner
trusted. A place that cannot be used is a ``BrokerStartError`` naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from ..procs import capabilities
from ..slices.model import GpuInfo
from ..wire.connection import (
    CONNECTION_FILE,
    SYSTEM_RUNTIME_DIR,
    ConnectionInfo,
    new_runtime_dir,
    runtime_dir_for,
    usable_runtime_dir,
    write_connection_file,
)
from ..wire.paths import UnsafePath, private_dir, secure_dir
from .gpu_lock import GpuBusy, GpuLocks
from .identity import Account
from .store import Store

STATE_FILES = ("broker.sqlite", "broker.sqlite-wal", "broker.sqlite-shm", "broker.lock")
# bit numbers; CAP_KILL: executors that became their holders are the broker's to stop
NEEDED_CAPABILITIES = {"CAP_CHOWN": 0, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7}


class BrokerStartError(Exception):
    """The broker cannot start (state dir not writable, another broker on it, bad layout)."""


def check_privileges() -> None:
    """A multi-user broker must be able to switch executors to their holders."""
    if os.geteuid() == 0:
        return
    effective = capabilities().get("CapEff", 0)
    missing = [name for name, bit in NEEDED_CAPABILITIES.items() if not effective >> bit & 1]
    if missing:
        raise BrokerStartError(
            f"--multi-user needs root or the capabilities CAP_SETUID, CAP_SETGID, CAP_CHOWN "
            f"and CAP_KILL (missing: {', '.join(missing)}); see docs/deploy-multi-user.md"
        )


class Places:
    def __init__(
        self,
        state_path: Path,
        *,
        multi_user: bool,
        runtime_dir: str = "",
        spill_dir: str = "",
        lock_dir: str = "",
    ) -> None:
        self.state_path = state_path
        self.multi_user = multi_user
        self.runtime_option = runtime_dir
        self.spill_option = spill_dir
        self.gpu_locks = GpuLocks(Path(lock_dir))
        self.state_lock: IO[str] | None = None
        self.runtime_path = Path()
        self.spill_root = Path()
        self.connection_path: Path | None = None

    # -- the state dir -------------------------------------------------------------------
    def prepare_state(self) -> None:
        """The private state dir, writable, and locked against a second broker on it."""
        try:
            private_dir(self.state_path)
            probe = self.state_path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except UnsafePath as exc:
            raise BrokerStartError(str(exc)) from None
        except OSError as exc:
            raise BrokerStartError(
                f"state dir {self.state_path} is not usable: {exc.strerror or exc}"
            ) from None
        for name in STATE_FILES:  # files of an older version, made under a looser umask
            with contextlib.suppress(FileNotFoundError):
                os.chmod(self.state_path / name, 0o600)
        self.state_lock = open(self.state_path / "broker.lock", "a")  # noqa: SIM115 (for life)
        try:
            fcntl.flock(self.state_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BrokerStartError(
                f"another broker is already running on state dir {self.state_path}"
            ) from None

    def lock_gpus(self, gpus: list[GpuInfo], user: str) -> None:
        """One broker per GPU, node-wide (gpu_lock.py)."""
        holder = {"pid": os.getpid(), "state_dir": str(self.state_path), "user": user}
        try:
            self.gpu_locks.acquire(gpus, holder)
        except GpuBusy as exc:
            raise BrokerStartError(str(exc)) from None

    # -- the runtime dir -----------------------------------------------------------------
    def prepare_runtime(self, store: Store) -> Path:
        """The sockets' directory. Multi-user: public (0755). Single-user: private (0700),
        derived from the state dir where a short path fits, else an unpredictable one
        remembered in the state (a restarted broker finds its executors there)."""
        self.runtime_path = self._runtime(store)
        return self.runtime_path

    def _runtime(self, store: Store) -> Path:
        try:
            if self.runtime_option or self.multi_user:
                path = Path(self.runtime_option or SYSTEM_RUNTIME_DIR)
                return secure_dir(path, 0o755 if self.multi_user else 0o700)
            derived = runtime_dir_for(self.state_path)
            if derived is not None:
                return derived
        except UnsafePath as exc:
            raise BrokerStartError(str(exc)) from None
        except OSError as exc:
            raise BrokerStartError(f"runtime dir is not usable: {exc}") from None
        remembered = store.meta("runtime_dir")
        if remembered and usable_runtime_dir(remembered):
            return Path(remembered)
        path = new_runtime_dir()
        store.set_meta("runtime_dir", str(path))
        return path

    # -- spilled device data -------------------------------------------------------------
    def prepare_spill(self) -> Path:
        default = (
            self.state_path.with_name(self.state_path.name + "-spill")
            if self.multi_user
            else self.state_path / "spill"
        )
        path = Path(self.spill_option or default)
        try:  # multi-user: others may pass (to their own 0700 dirs inside) but not list
            self.spill_root = secure_dir(path, 0o711 if self.multi_user else 0o700)
        except (UnsafePath, OSError) as exc:
            raise BrokerStartError(f"spill dir {path} is not usable: {exc}") from None
        return self.spill_root

    def spill_path(self, lease_id: str, owner: Account | None) -> Path:
        """Where a lease's device data goes: multi-user, inside a 0700 directory of its owner
        (the executor writes there as that user)."""
        if owner is None:
            return self.spill_root / lease_id
        user_dir = secure_dir(self.spill_root / owner.user, 0o700, uid=owner.uid, gid=owner.gid)
        return user_dir / lease_id

    # -- the connection file -------------------------------------------------------------
    def write_connection(self, info: ConnectionInfo) -> Path:
        """broker.json: public (0644, no key) in the runtime dir of a multi-user broker, else
        0600 with the hello key in the state dir."""
        if self.multi_user:
            path, mode = self.runtime_path / CONNECTION_FILE, 0o644
        else:
            path, mode = self.state_path / CONNECTION_FILE, 0o600
        write_connection_file(path, info, mode)
        self.connection_path = path
        return path

    def release(self) -> None:
        """At a graceful stop: the connection file goes, then the locks."""
        if self.connection_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.connection_path.unlink()
        self.gpu_locks.release()
        if self.state_lock is not None:
            self.state_lock.close()
