"""The process's slice: the one Session that ``%%gpufunc``, ``%gpu`` and ``@gpufunc`` use.

In a mig-kernel kernel the provisioner puts the lease settings in the environment
(``MIG_KERNEL_TAG``, ``MIG_KERNEL_PROFILE``, ``MIG_KERNEL_IDLE_TIMEOUT``). The holder attaches
to the lease the provisioner acquired (found by its tag, so a restarted kernel finds it too), or
acquires one on first use (lazy kernels, a start that found no free slice). In any other
process it acquires on first use, untagged.

A kernel whose start got no slice (broker refused, unreachable, no free slice) still starts;
the provisioner says why in ``MIG_KERNEL_NO_SLICE_REASON``, and the holder keeps the latest
such reason (``no_slice_reason``) so ``%gpu status`` can show it in the notebook.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .wire.errors import LeaseEnded, MigKernelError
from .wire.reach import describe_failure

if TYPE_CHECKING:  # the client (and NumPy) load on the first GPU use, not at kernel start
    from .client import QueuedCallback, Session

ENV_TAG = "MIG_KERNEL_TAG"
ENV_PROFILE = "MIG_KERNEL_PROFILE"
ENV_IDLE_TIMEOUT = "MIG_KERNEL_IDLE_TIMEOUT"
ENV_NO_SLICE_REASON = "MIG_KERNEL_NO_SLICE_REASON"  # one line: why the kernel started without one
REACQUIRABLE = ("idle", "suspended")  # ended leases whose data the next call brings back


class ProfileMismatch(ValueError):
    """The process holds a slice of another profile than the one asked for."""


def _print(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


class SliceHolder:
    def __init__(
        self,
        *,
        profile: str | None = None,
        idle_timeout: float | None = None,
        tag: str | None = None,
        broker: str | None = None,
        notify: Callable[[str], None] = _print,
        no_slice_reason: str | None = None,
    ) -> None:
        self.profile = profile
        self.idle_timeout = idle_timeout
        self.tag = tag
        self.broker = broker
        self.notify = notify  # one-line messages for the user (re-acquired, new lease)
        self.on_queued: QueuedCallback | None = None  # queue positions while a request waits
        self.session: Session | None = None
        # Why the process holds no slice, as of the last attempt to get one that failed (the
        # provisioner's at kernel start, an attach, a GPU cell's lease); None once one is held.
        self.no_slice_reason = no_slice_reason
        self.lock = threading.RLock()

    @classmethod
    def from_environment(cls) -> SliceHolder:
        idle = os.environ.get(ENV_IDLE_TIMEOUT)
        return cls(
            profile=os.environ.get(ENV_PROFILE) or None,
            idle_timeout=float(idle) if idle else None,
            tag=os.environ.get(ENV_TAG) or None,
            no_slice_reason=os.environ.get(ENV_NO_SLICE_REASON) or None,
        )

    # -- getting the session ---------------------------------------------------------------
    def _queued(self, position: int, length: int, reason: str = "") -> None:
        if self.on_queued is not None:
            self.on_queued(position, length, reason)

    def _reacquired(self, info: dict[str, Any]) -> None:
        session = self.session
        where = f"{session.profile} on {session.slice['id']}" if session else "a slice"
        restored = info.get("restored", 0)
        line = (
            f"mig-kernel: slice re-acquired in {info['seconds']:.2f} s ({where}); "
            f"{restored} device object{'s' if restored != 1 else ''} restored"
        )
        if info.get("error") and not restored:
            line += f" ({info['error']})"
        self.notify(line)

    def attach_existing(self, *, reset: bool = True) -> Session | None:
        """Take over this process's tagged lease if one is active (acquired by the provisioner,
        or by this kernel before a restart). ``reset`` frees what an earlier process of the
        holder left on the executor: nothing here can refer to it."""
        if self.tag is None:
            return None
        from .client import attach

        with self.lock:
            if self.session is not None and self._usable(self.session):
                return self.session
            try:
                session = attach(
                    tag=self.tag,
                    broker=self.broker,
                    on_reacquire=self._reacquired,
                    on_queued=self._queued,
                )
                if session is not None and reset:
                    session.reset()
            except (MigKernelError, OSError) as exc:
                self.no_slice_reason = describe_failure(exc)
                raise
            if session is not None:
                self.no_slice_reason = None
            self.session = session or self.session
            return session

    @staticmethod
    def _usable(session: Session) -> bool:
        return (
            not session.released
            and not session.detached
            and (session.ended is None or session.ended in REACQUIRABLE)
        )

    def current(self, *, attach: bool = False) -> Session | None:
        """The held session, without acquiring. ``attach`` first takes over this process's
        tagged lease if the background attach at kernel start has not done so yet."""
        if attach:
            self.attach_existing()
        with self.lock:  # an attach in progress finishes first
            session = self.session
            return session if session is not None and self._usable(session) else None

    def session_for(self, profile: str | None = None) -> Session:
        """The process's session, acquiring (and waiting in the queue) if it has none."""
        from .client import connect

        with self.lock:
            session = self.current()
            if session is not None:
                if profile is not None and profile != session.profile:
                    raise ProfileMismatch(
                        f"this kernel holds a {session.profile} slice ({session.slice['id']}); "
                        f"to use {profile}, release it first (%gpu release)"
                    )
                return session
            ended = self.session.ended if self.session is not None else None
            session = self.attach_existing()
            if session is None:
                try:
                    session = connect(
                        profile or self.profile,
                        idle_timeout=self.idle_timeout,
                        tag=self.tag,
                        broker=self.broker,
                        on_queued=self._queued,
                        on_reacquire=self._reacquired,
                    )
                except (MigKernelError, OSError) as exc:
                    self.no_slice_reason = describe_failure(exc)
                    raise
                self.no_slice_reason = None
            if ended is not None:
                self.notify(
                    f"mig-kernel: the previous lease ended ({ended}); its device data is lost. "
                    f"Leased {session.profile} on {session.slice['id']}"
                )
            self.session = session
            return session

    # -- giving it back --------------------------------------------------------------------
    def release(self, *, keep_data: bool = True) -> dict[str, Any] | None:
        """Give the slice back now. ``keep_data`` spills the device data so the next GPU call
        restores it (as after an idle reclaim); otherwise it is dropped."""
        with self.lock:
            session = self.current()
            if session is None:
                return None
            if session.ended in REACQUIRABLE:  # already given back
                return {"spilled": 0}
            if keep_data:
                return session.suspend()
            self.session = None
            session.close()
            return {"spilled": 0}

    def detach(self) -> None:
        """Leave the lease to the next process of this kernel (a restart)."""
        with self.lock:
            if self.session is not None:
                self.session.detach()
                self.session = None

    def close(self) -> None:
        with self.lock:
            if self.session is not None:
                with contextlib.suppress(LeaseEnded, MigKernelError):
                    self.session.close()
                self.session = None


_holder: SliceHolder | None = None
_holder_lock = threading.Lock()


def holder() -> SliceHolder:
    """The process's SliceHolder, configured from the environment on first use."""
    global _holder
    with _holder_lock:
        if _holder is None:
            _holder = SliceHolder.from_environment()
        return _holder


def current_session(profile: str | None = None) -> Session:
    """The Session of this process's slice (the kernel's, in a mig-kernel kernel), leased on
    first use."""
    return holder().session_for(profile)
