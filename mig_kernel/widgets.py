"""``SliceMonitor``: a live picture of the node's slices in a notebook (``%gpu monitor``).

The broker's watch stream (``mig_kernel.watch``) is received on one daemon thread, which sets
the ``value`` traits of two ``HTML`` widgets (ipywidgets sends trait changes to the frontend
from any thread; printing into an ``Output`` from a thread is what breaks). The thread blocks in
``receive(timeout<=0.5)``: no tight polling, and a stop is noticed within half a second.

Updates are coalesced to at most ``max_rate`` per second, always ending on the latest state: a
busy node publishes every 0.2 s and a browser need not redraw that often. While the viewer holds
a slice with an idle timeout, the picture is redrawn once a second (on the receive timeout) so
the countdown ticks between publications.

The watch stream anonymizes everyone and carries no lease details, so the viewer's own idle
timeout comes from a ``status`` answer: the initial one, and one more request the first time a
publication shows a slice of the viewer's that the monitor has no timeout for.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets

from .client import BrokerClient
from .partition_view import counts_down, render_header, render_html
from .watch import Watcher
from .wire.errors import MigKernelError

log = logging.getLogger(__name__)

RECEIVE_TIMEOUT = 0.5  # longest block in receive: how soon the thread notices a stop
TICK = 1.0  # countdown redraw period while the viewer's slice has an idle timeout
HELD = ("leased", "draining")


class SliceMonitor(ipywidgets.VBox):
    """The node's partition map, kept current from the broker's watch stream.

    ``state`` is the latest state drawn (with ``received_at`` added, and the viewer's known idle
    timeout filled into ``lease`` of its own slices); ``updates`` counts the states drawn after
    the initial one (countdown redraws are not counted). ``close()`` stops the thread, closes
    the sockets and the widgets; it is safe to call more than once.
    """

    def __init__(
        self,
        connection_file: str | os.PathLike[str] | None = None,
        *,
        max_rate: float = 4.0,
        this_slice: Callable[[], str | None] | None = None,
    ) -> None:
        """``this_slice`` tells, at each draw, which slice the viewing notebook's kernel
        holds (``%gpu monitor`` passes its kernel's): drawn as "this notebook", apart from the
        user's other slices. It is called on the monitor's thread and must not block."""
        if not max_rate > 0:
            raise ValueError(
                f"max_rate must be a positive number of updates per second: {max_rate}"
            )
        # The watcher first: if the broker cannot be reached, no widget (comm) is created.
        self.watcher = Watcher(connection_file)
        self.connection_file = connection_file
        self.this_slice = this_slice or (lambda: None)
        self.min_interval = 1.0 / max_rate
        self.updates = 0
        self.closed = False
        self._timeouts: dict[str, float | None] = {}  # own slice id -> idle timeout (None: unknown)
        self._client: BrokerClient | None = None  # for the own-lease lookups, made on first need
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            # Drawn before the widgets exist, so the frontend's first view shows the node.
            self.state: dict[str, Any] = self._prepare(self.watcher.initial)
            self.header = ipywidgets.HTML(
                render_header(self.state, updated=self.state["received_at"])
            )
            self.picture = ipywidgets.HTML(self._html())
        except BaseException:
            self.close()
            raise
        super().__init__(children=[self.header, self.picture], _dom_classes=["mig-monitor"])
        self._thread = threading.Thread(target=self._run, name="mig-slice-monitor", daemon=True)
        self._thread.start()

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        pending: dict[str, Any] | None = None
        next_allowed = 0.0  # monotonic time the next state may be drawn
        next_tick = time.monotonic() + TICK
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if pending is not None and now >= next_allowed:
                    self._guarded(self._show, pending)
                    pending, next_allowed, next_tick = None, now + self.min_interval, now + TICK
                    continue
                ticking = any(counts_down(s) for s in self.state.get("slices", []))
                if ticking and now >= next_tick:
                    self._guarded(self._redraw)
                    next_tick = now + TICK
                wait = RECEIVE_TIMEOUT
                if pending is not None:
                    wait = min(wait, next_allowed - now)
                if ticking:
                    wait = min(wait, next_tick - now)
                state = self.watcher.receive(timeout=max(0.0, wait))
                if state is not None:
                    pending = state  # a newer state replaces one not yet drawn
        finally:
            self.watcher.close()
            if self._client is not None:
                self._client.close()

    def _guarded(self, fn: Any, *args: Any) -> None:
        """A state the picture cannot draw must not end the monitor: it is logged and skipped."""
        try:
            fn(*args)
        except Exception:
            log.exception("mig-kernel monitor: could not draw a state")

    # -- drawing -------------------------------------------------------------------------------
    def _prepare(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` as drawn: own idle timeouts filled in, stamped with its arrival."""
        return {**self._with_own_timeouts(state), "received_at": time.time()}

    def _show(self, state: dict[str, Any]) -> None:
        self.state = state = self._prepare(state)
        self.header.value = render_header(state, updated=state["received_at"])
        self.picture.value = self._html()
        self.updates += 1

    def _redraw(self) -> None:
        self.picture.value = self._html()

    def _html(self) -> str:
        return render_html(self.state, this_slice=self.this_slice())

    def _with_own_timeouts(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with the idle timeout of the viewer's own slices filled in where the
        state itself lacks it (watch states carry no lease details)."""
        own = {
            s.get("id") for s in state.get("slices", []) if s.get("mine") and s.get("state") in HELD
        }
        for slice_id in list(self._timeouts):
            if slice_id not in own:  # that lease is gone: a later one may have another timeout
                del self._timeouts[slice_id]
        self._learn(state)
        if any(s not in self._timeouts for s in own):
            fresh = self._status()
            if fresh is not None:  # newer than ``state``; keeps its place in the stream
                self._learn(fresh)
                state = {**fresh, "seq": state["seq"]} if "seq" in state else fresh
            for slice_id in own:
                self._timeouts.setdefault(slice_id, None)  # asked once; not again for this lease
        slices = []
        for entry in state.get("slices", []):
            limit = self._timeouts.get(entry.get("id"))
            if entry.get("mine") and entry.get("lease") is None and limit is not None:
                entry = {**entry, "lease": {"idle_timeout": limit}}
            slices.append(entry)
        return {**state, "slices": slices}

    def _learn(self, state: dict[str, Any]) -> None:
        for entry in state.get("slices", []):
            lease = entry.get("lease")
            if entry.get("mine") and isinstance(lease, dict) and "idle_timeout" in lease:
                self._timeouts[entry["id"]] = lease["idle_timeout"]

    def _status(self) -> dict[str, Any] | None:
        """A status answer (the viewer's leases in full), or None if the broker did not answer:
        the picture then shows the idle time without a countdown."""
        try:
            if self._client is None:
                self._client = BrokerClient(self.connection_file, timeout=2.0)
            return self._client.status()
        except (MigKernelError, OSError) as exc:
            log.warning("mig-kernel monitor: no status for the idle countdown: %s", exc)
            if self._client is not None:
                self._client.close()
                self._client = None
            return None

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the thread (within ``RECEIVE_TIMEOUT``), close the sockets and the widgets.
        ipywidgets calls this too (``Widget.close_all``, garbage collection)."""
        stop = getattr(self, "_stop", None)  # absent if the constructor failed early
        if stop is not None and not self.closed:
            self.closed = True
            stop.set()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5.0)
            if thread is None or not thread.is_alive():  # else it closes them when it ends
                self.watcher.close()
                if self._client is not None:
                    self._client.close()
            for name in ("header", "picture"):
                child = getattr(self, name, None)
                if child is not None:
                    child.close()
        super().close()
