"""The IPython extension of mig-kernel kernels: ``%%gpufunc`` and ``%gpu``.

``%%gpufunc`` runs a cell on the kernel's slice as a GPU function: the names it reads from the
notebook are found by static analysis (cell.py) and shipped as arguments, the names it binds come
back. The kernel itself never touches a GPU.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from ..current import ProfileMismatch, SliceHolder, holder
from ..wire.errors import MigKernelError
from ..wire.reach import describe_failure
from . import errors
from .cell import CellInputs, CellOutcome, plan_cell, run_on_slice, select_inputs


class _QueueDisplay:
    """One output line that shows the queue position, and why the request waits, while it
    waits. A request beyond the user's limit waits for one of their own slices: the broker's
    reason names the notebooks that hold them and how to free one. Once the wait is over the
    line is replaced by one saying how long it took (``done``), so no stale "waiting" stays in
    the cell's output."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.handle: Any = None
        self.last: tuple[int, int, str] | None = None
        self.started = time.monotonic()

    def __call__(self, position: int, length: int, reason: str = "") -> None:
        if (position, length, reason) == self.last:
            return
        self.last = (position, length, reason)
        text = f"mig-kernel: waiting for {self.what}: position {position} of {length} in the queue"
        if reason:
            text += f"\n{reason}"
        self._show(text)

    def done(self, session: Any) -> None:
        """The wait is over: replace the line (if one was shown) with its outcome."""
        if self.handle is None:
            return
        waited = time.monotonic() - self.started
        if session is None:
            self._show(f"mig-kernel: stopped waiting for {self.what} after {waited:.0f} s")
        else:
            self._show(
                f"mig-kernel: got {session.profile} on {session.slice['id']} after waiting "
                f"{waited:.0f} s in the queue"
            )

    def _show(self, text: str) -> None:
        if self.handle is None:
            self.handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": text}, raw=True)


def _render_brief(exc: BaseException, *lines: str) -> None:
    """Show an error as its type and one line of cause (plus ``lines``), without the client's
    frames: a broker's refusal or an unreachable broker is about the node, not about code the
    user can fix, and a traceback through mig-kernel's internals would hide the reason."""
    shown = [f"{type(exc).__name__}: {describe_failure(exc)}", *lines]
    exc._render_traceback_ = lambda: shown  # type: ignore[attr-defined]


def _name_unshippable(exc: Exception, inputs: dict[str, Any]) -> None:
    """When a cell's inputs could not be pickled (nothing was sent), say which one and why,
    in one line, instead of the pickler's message from deep inside an object."""
    if hasattr(exc, "remote_traceback") or isinstance(exc, MigKernelError):
        return  # raised on the slice, or a refusal: not about pickling the inputs
    import numpy as np

    from ..remote import RemoteArray, RemoteObject
    from ..wire.payload import find_unpicklable

    found = find_unpicklable(
        inputs,
        lambda o: ("x",) if isinstance(o, (np.ndarray, RemoteArray, RemoteObject)) else None,
    )
    if found is None:
        return
    name, why = found
    kind = type(inputs[name])
    line = (
        f"{type(exc).__name__}: the GPU cell reads {name!r} ({kind.__module__}.{kind.__qualname__}"
        f"), which cannot be sent to the slice: {why}. Open files, locks, sockets and the like "
        "belong to this process: create them inside the GPU cell"
    )
    exc._render_traceback_ = lambda: [line]  # type: ignore[attr-defined]


def _bind_outcome(user_ns: dict[str, Any], outcome: CellOutcome) -> Any:
    """Write a GPU cell's outputs into the notebook and remove the names it unbound (the rule:
    cell.py, README). An output this kernel cannot load (its class or module is not
    importable here) is left as it was, with one line on stderr; the others are bound."""
    from ..wire.payload import Unloadable

    for name, value in outcome.outputs.items():
        if isinstance(value, Unloadable):
            print(f"mig-kernel: {name} was not brought back: {value.reason}", file=sys.stderr)
        else:
            user_ns[name] = value
    for name in outcome.unbound:
        user_ns.pop(name, None)
    value = outcome.shown.get("value")
    if isinstance(value, Unloadable):
        print(f"mig-kernel: the cell's value was not brought back: {value.reason}", file=sys.stderr)
        return None
    return value


@magics_class
class GpuMagics(Magics):
    def __init__(self, shell: InteractiveShell, slice_holder: SliceHolder) -> None:
        super().__init__(shell)
        self.holder = slice_holder
        self._profiles: set[str] | None = None
        self._monitor: Any = None  # the kernel's SliceMonitor, made by the first %gpu monitor

    # -- helpers ---------------------------------------------------------------------------
    def _offered_profiles(self) -> set[str]:
        from ..client import BrokerClient

        if self._profiles is None:
            with BrokerClient(self.holder.broker, timeout=5.0) as client:
                self._profiles = {s["profile"] for s in client.status()["slices"]}
        return self._profiles

    def _check_profile(self, profile: str | None) -> None:
        if profile is None:
            return
        try:
            offered = self._offered_profiles()
        except MigKernelError as exc:
            raise UsageError(f"cannot reach the mig-kernel broker: {exc}") from None
        if profile not in offered:
            raise UsageError(
                f"unknown profile {profile!r}: this node offers {', '.join(sorted(offered))}"
            )

    def _session(self, profile: str | None) -> Any:
        want = profile or self.holder.profile
        queue = _QueueDisplay(f"a {want} slice" if want else "a GPU slice")
        self.holder.on_queued = queue
        session = None
        try:
            session = self.holder.session_for(profile)
            return session
        except ProfileMismatch as exc:
            raise UsageError(str(exc)) from None
        except (MigKernelError, OSError) as exc:
            _render_brief(
                exc,
                "mig-kernel: no GPU slice for this cell; the next GPU cell asks the broker again",
            )
            raise
        finally:
            self.holder.on_queued = None
            queue.done(session)

    # -- %%gpufunc ---------------------------------------------------------------------------
    @magic_arguments()
    @argument("--profile", default=None, help="Slice profile to run on, e.g. 1g.10gb.")
    @argument("--to-host", action="store_true", help="Return device arrays as numpy arrays.")
    @argument("--timeout", type=float, default=None, help="Seconds the cell may run on the slice.")
    @cell_magic
    def gpufunc(self, line: str, cell: str) -> Any:
        """Run the cell on this kernel's GPU slice. Notebook names it reads are its inputs;
        names it assigns come back (device arrays as RemoteArray unless --to-host)."""
        args = parse_argstring(self.gpufunc, line)
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        source = self.shell.transform_cell(cell)
        if "get_ipython()" in source:
            raise UsageError(
                "IPython magics and shell commands (%, !) cannot run on the slice; move them to "
                "an ordinary cell"
            )
        # Named so that errors.py shows tracebacks and syntax errors as "Cell In[7], line 3".
        filename = errors.register_cell(self.shell.execution_count, cell, source)
        plan = plan_cell(source, filename)  # a SyntaxError here: nothing is sent
        self._check_profile(args.profile)
        inputs = select_inputs(plan, self.shell.user_ns, self.shell.user_ns_hidden)
        session = self._session(args.profile)
        try:
            outcome = session.run(  # errors: shown by errors.py
                run_on_slice,
                plan.source,
                filename,
                CellInputs(inputs),
                plan.outputs,
                plan.last_expression,
                plan.deleted,
                to_host=args.to_host,
                timeout=args.timeout,
            )
        except Exception as exc:
            _name_unshippable(exc, inputs)
            raise
        return _bind_outcome(self.shell.user_ns, outcome)

    # -- %gpu ----------------------------------------------------------------------------------
    @magic_arguments()
    @argument("action", choices=["status", "acquire", "release", "monitor", "debug"])
    @argument("switch", nargs="?", choices=["on", "off"], help="debug: full tracebacks on or off.")
    @argument("--profile", default=None, help="acquire: the slice profile.")
    @argument(
        "--drop", action="store_true", help="release: drop the device data instead of keeping it."
    )
    @line_magic
    def gpu(self, line: str) -> None:
        """%gpu status | acquire [--profile P] | release [--drop] | monitor | debug [on|off]"""
        args = parse_argstring(self.gpu, line)
        getattr(self, f"_gpu_{args.action}")(args)

    def _gpu_debug(self, args: Any) -> None:
        """Full tracebacks (mig-kernel's frames, the slice's whole traceback) for errors that
        are otherwise shown in a line or three; for a bug report. Also MIG_KERNEL_DEBUG=1."""
        if args.switch is not None:
            errors.set_debug(args.switch == "on")
        state = "on: errors show full tracebacks" if errors.debug() else "off: errors in brief"
        print(f"mig-kernel: debug {state} (%gpu debug on|off)")

    def _gpu_status(self, args: Any) -> None:
        try:
            session = self.holder.current(attach=True)
        except (MigKernelError, OSError):
            session = None  # the holder has recorded why
        if session is None:
            reason = self.holder.no_slice_reason
            if reason:
                print(f"GPU slice: none — {reason}")
                print(
                    "(the next GPU cell, or %gpu acquire, asks the broker again and waits in the "
                    "queue, saying why, until a slice is free)"
                )
            else:
                print(
                    "GPU slice: none (the next GPU cell asks for one, and waits in the queue, "
                    "saying why, until one is free)"
                )
            return
        if session.ended:
            print(
                f"mig-kernel: the slice was given back ({session.ended}); the next GPU cell "
                f"leases one again and restores the device data (lease was {session.id})"
            )
            return
        try:
            node = self._node_status()
        except (MigKernelError, OSError) as exc:  # the lease's own facts are still worth showing
            node = {"slices": []}
            print(f"broker     unreachable: {describe_failure(exc)}")
        mine = next((s for s in node["slices"] if s["id"] == session.slice["id"]), {})
        idle = session.idle_seconds
        if idle is None:
            idle = mine.get("idle_seconds")
        limit = session.idle_timeout
        print(f"slice      {session.slice['id']}  ({session.slice.get('uuid', '')})")
        print(f"profile    {session.profile}")
        print(f"isolation  {session.isolation}")
        used = mine.get("memory_used", 0)
        from ..partition_view import memory_text  # not at kernel start: it loads slices/

        print(f"memory     {memory_text(used, session.memory_total)} used")
        idle_text = f"{idle:.0f} s" if idle is not None else "unknown"
        limit_text = f"released after {limit:.0f} s idle" if limit else "never released when idle"
        print(f"idle       {idle_text} ({limit_text})")
        print(f"lease      {session.id}")

    def _node_status(self) -> dict[str, Any]:
        from ..client import BrokerClient

        with BrokerClient(self.holder.broker, timeout=5.0) as client:
            return client.status()

    def _gpu_acquire(self, args: Any) -> None:
        self._check_profile(args.profile)
        started = time.perf_counter()
        session = self._session(args.profile)
        print(
            f"mig-kernel: holding {session.profile} on {session.slice['id']} "
            f"({session.isolation}), lease {session.id} ({time.perf_counter() - started:.2f} s)"
        )

    def _gpu_release(self, args: Any) -> None:
        session = self.holder.current(attach=True)
        report = self.holder.release(keep_data=not args.drop)
        if session is None or report is None:
            print("mig-kernel: this kernel holds no GPU slice")
            return
        if args.drop:
            print(f"mig-kernel: released {session.slice['id']}; device data dropped")
            return
        spilled = int(report.get("spilled", 0))
        error = report.get("error")
        kept = f"{spilled} device object{'s' if spilled != 1 else ''} kept on the host"
        print(
            f"mig-kernel: released {session.slice['id']}; {kept}"
            + (f" ({error})" if error else "")
            + "; the next GPU cell leases a slice again and restores them"
        )

    def _gpu_monitor(self, args: Any) -> None:
        """The node's partitions, live (``mig_kernel.widgets.SliceMonitor``); a table where
        ipywidgets is missing. One monitor per kernel: showing it again adds a view of the same
        widget (one thread and one socket however often the magic runs) until it is closed."""
        try:
            from ..widgets import SliceMonitor
        except ImportError as exc:
            print(f"mig-kernel: no live monitor ({exc}); install ipywidgets>=8.1 for one")
            self._monitor_table()
            return
        if self._monitor is None or self._monitor.closed:
            try:
                self._monitor = SliceMonitor(self.holder.broker, this_slice=self._held_slice)
            except MigKernelError as exc:
                raise UsageError(f"cannot reach the mig-kernel broker: {exc}") from None
        display(self._monitor)

    def _held_slice(self) -> str | None:
        """The slice this kernel holds, read without the holder's lock (the monitor's thread
        must not wait behind a GPU cell that is queued or running)."""
        session = self.holder.session
        if session is None or session.released or session.detached or session.ended:
            return None
        return str(session.slice["id"])

    def _monitor_table(self) -> None:
        from ..partition_view import memory_text

        status = self._node_status()
        print(f"node {status['node']} ({status['backend']})")
        print(f"{'slice':10} {'profile':14} {'isolation':9} {'state':9} {'memory':>22}  holder")
        for s in status["slices"]:
            memory = memory_text(s["memory_used"], s["memory_total"])
            holder_text = (s["holder"] or "") + (" (this kernel's user)" if s.get("mine") else "")
            print(
                f"{s['id']:10} {s['profile']:14} {s['isolation']:9} {s['state']:9} "
                f"{memory:>22}  {holder_text}"
            )
        if status["queue"]:
            print(f"queue: {len(status['queue'])} waiting")


def load_ipython_extension(ip: InteractiveShell) -> None:
    ip.register_magics(GpuMagics(ip, holder()))
    errors.install(ip)
