"""What the jupyter_server extension keeps of the broker, per server: a few blocking
``BrokerClient``\\ s for request threads (``BrokerPool``) and the watch stream's latest
publication number for long polls (``StateFeed``).

Both are blocking ZeroMQ code; the tornado loop never runs it. Request handlers call the pool
through ``asyncio.to_thread`` (a broker request takes about a millisecond), and the feed reads
the watch stream on its own daemon thread and hands each new ``seq`` to the loop with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mig_kernel.client import BrokerClient
from mig_kernel.watch import Watcher
from mig_kernel.wire.connection import connection_file_path, read_connection_file
from mig_kernel.wire.errors import AuthenticationError, BrokerUnavailable, MigKernelError

T = TypeVar("T")

RECEIVE_POLL = 0.5  # seconds between the feed thread's checks for a stop or a new broker
RECONNECT_DELAY = 1.0  # seconds between the feed's attempts to reach a broker that is gone
UNWATCHED_WAIT = 2.0  # seconds a long poll waits while the feed has no broker


class BrokerPool:
    """Blocking broker clients that request threads borrow one at a time.

    One ``hello`` opens a client session and every socket of the pool signs with it: the
    broker stores each session it opens, so a hello per HTTP request would fill its table.
    The session belongs to the broker that wrote the connection file; when the file names
    another broker (restarted, or a new state dir) or the broker no longer knows the session,
    the pool starts over with a fresh hello.

    The session is the server's user: its OS user (the kernel of the socket says so), or,
    on a JupyterHub node where hub users share an OS user, the hub user whose server this is
    (the server's own ``JUPYTERHUB_API_TOKEN`` travels in the hello, see
    broker/hub_identity.py). A single-user server serves one hub user, so one session speaks
    for every request it gets.
    """

    def __init__(
        self, connection_file: str | None = None, *, timeout: float = 5.0, size: int = 4
    ) -> None:
        self.connection_file = connection_file  # None: $MIG_KERNEL_BROKER or the default
        self.timeout = timeout
        self.size = size  # idle clients kept; more threads at once get a socket of their own
        self.pseudonym: str | None = None  # how the server's user appears to other users
        self.admin = False  # whether the server's user is a broker admin
        self._lock = threading.Lock()
        self._idle: list[BrokerClient] = []
        self._credentials: tuple[str, bytes] | None = None
        self._broker: tuple[str, str, int] | None = None  # (endpoint, key, pid) of the session
        self._closed = False

    def call(self, fn: Callable[[BrokerClient], T]) -> T:
        """Run ``fn`` with a client of its own (blocking: call it from a worker thread)."""
        for attempt in range(2):
            client = self._take()
            try:
                result = fn(client)
            except AuthenticationError:
                self._discard(client, forget_session=True)
                if attempt:
                    raise
                continue  # the broker no longer knows the session: hello again, once
            except BrokerUnavailable:
                self._discard(client, forget_session=False)
                raise
            except BaseException:
                self._give_back(client)  # an error reply leaves the socket usable
                raise
            self._give_back(client)
            return result
        raise AssertionError("unreachable")

    def _take(self) -> BrokerClient:
        info = read_connection_file(self.connection_file)  # BrokerUnavailable when it is gone
        broker = (info.endpoint, info.key, info.pid)
        with self._lock:
            if self._closed:
                raise BrokerUnavailable("the server is shutting down")
            if broker != self._broker:
                self._forget_locked()
                self._broker = broker
            if self._idle:
                return self._idle.pop()
            credentials = self._credentials
        if credentials is not None:
            return BrokerClient(self.connection_file, timeout=self.timeout, credentials=credentials)
        client = BrokerClient(self.connection_file, timeout=self.timeout)
        with self._lock:
            self._credentials = (client.client_id, client.key)
            self.pseudonym = client.session.get("pseudonym")
            self.admin = bool(client.session.get("admin"))
        return client

    def _give_back(self, client: BrokerClient) -> None:
        with self._lock:
            if (
                not self._closed
                and len(self._idle) < self.size
                and (client.client_id, client.key) == self._credentials
            ):
                self._idle.append(client)
                return
        client.close()

    def _discard(self, client: BrokerClient, *, forget_session: bool) -> None:
        client.close()
        if forget_session:
            with self._lock:
                if (client.client_id, client.key) == self._credentials:
                    self._forget_locked()

    def _forget_locked(self) -> None:
        for client in self._idle:
            client.close()
        self._idle.clear()
        self._credentials = None
        self._broker = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._forget_locked()


def _file_identity(connection_file: str | None) -> tuple[int, int] | None:
    """(inode, mtime) of the connection file, None when it is gone: a broker that starts
    writes a new file (os.replace), one that stops gracefully removes it."""
    try:
        st = os.stat(connection_file_path(connection_file))
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


class StateFeed:
    """The latest ``seq`` of the broker's watch stream, and waiting for it to change.

    One per server, bound to the server's event loop. Its thread runs a ``Watcher`` and posts
    each publication's ``seq`` to the loop; ``wait_change`` (on the loop) returns once ``seq``
    differs from the caller's. Differs, not exceeds: a restarted broker counts from 0 again,
    and a client holding a number of the old broker must get the new state at once.

    The thread ends when ``stop`` is called or the loop is closed (jupyter_server has no stop
    hook for a plain module extension; a server's loop closes when it stops), closing its
    socket and the ``on_stop`` resources; it is a daemon, and an atexit hook stops it too.
    """

    def __init__(
        self,
        connection_file: str | None,
        loop: asyncio.AbstractEventLoop,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.connection_file = connection_file
        self.loop = loop
        self.on_stop = on_stop
        self.seq: int | None = None  # None until the watcher first reached a broker
        self.connected = False
        self.ready = asyncio.Event()  # set after the first attempt to reach the broker
        self._changed = asyncio.Event()  # replaced by a fresh one at every notification
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mig-kernel watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- on the loop -----------------------------------------------------------------------
    async def wait_change(self, after: int, timeout: float) -> bool:
        """Wait until ``seq`` is known and differs from ``after``, or the broker was lost or
        changed while waiting; False after ``timeout`` seconds without that.

        While the feed has no broker the wait is short (``UNWATCHED_WAIT``): the answer that
        follows says whether the broker is gone (503) or back, and a client polling then
        asks at most that often."""
        if not self.connected:
            timeout = min(timeout, UNWATCHED_WAIT)
        deadline = self.loop.time() + timeout
        while self.seq is None or self.seq == after:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                return False
            if not self.connected:
                return True  # the broker went away: the answer says so (503) at once
        return True

    def _notify(self, seq: int | None, connected: bool) -> None:
        if seq is not None:
            self.seq = seq
        self.connected = connected
        self.ready.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- on the thread ---------------------------------------------------------------------
    def _stopping(self) -> bool:
        return self._stop.is_set() or self.loop.is_closed()

    def _post(self, seq: int | None, connected: bool) -> None:
        try:
            self.loop.call_soon_threadsafe(self._notify, seq, connected)
        except RuntimeError:  # the loop is closed: the server has stopped
            self._stop.set()

    def _run(self) -> None:
        watcher: Watcher | None = None
        seen: tuple[int, int] | None = None
        told_lost = False  # waiters hear of a lost broker once, not at every retry
        try:
            while not self._stopping():
                if watcher is None:
                    seen = _file_identity(self.connection_file)
                    try:
                        watcher = Watcher(self.connection_file)
                    except (MigKernelError, OSError):
                        if not told_lost:
                            told_lost = True
                            self._post(None, connected=False)
                        self._stop.wait(RECONNECT_DELAY)
                        continue
                    told_lost = False
                    self._post(watcher.seq, connected=True)
                if watcher.receive(RECEIVE_POLL) is not None:
                    self._post(watcher.seq, connected=True)
                elif _file_identity(self.connection_file) != seen:
                    watcher.close()  # another broker (or none): subscribe again
                    watcher = None
        finally:
            if watcher is not None:
                watcher.close()
            if self.on_stop is not None:
                with contextlib.suppress(Exception):
                    self.on_stop()


def status_and_seq(client: BrokerClient, seq: int | None) -> tuple[dict[str, Any], int]:
    """The broker's status for this user, and ``seq`` (asked of the broker when the feed
    has none yet, so an answer always carries a number a long poll can wait on)."""
    if seq is None:
        seq = int(client.watch_info()["seq"])
    return client.status(), seq
