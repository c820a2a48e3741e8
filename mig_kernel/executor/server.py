"""The executor's request loop: one process, one slice, one tenant key at a time.

Dispatch is table-driven (``control_<type>`` for the broker, ``tenant_<type>`` for the lease
holder). Any request that fails gets an error reply naming the problem; the loop never dies of a
bad message.

The main thread serves the socket and runs the calls itself, so a short call's result leaves
from the thread that received the invocation, with no hand-off between threads. A ZeroMQ socket
must not be used by two threads at once: whoever holds ``sock_lock`` owns it. While a call runs
the main thread does not hold it, and once the call has run for ``TAKEOVER`` seconds the
watcher thread serves everything else (stage-in of the next invocation, output, cancel, the
deadline, the broker's requests) until the call ends. It holds the socket only while it
handles something, and waits on the sockets' fds without it, so the main thread has it back
as soon as the call ends, without waking the watcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from ..procs import usable_cpus
from ..wire import lane as lane_wire
from ..wire import payload as payload_wire
from ..wire.connection import bind_private
from ..wire.errors import (
    AuthenticationError,
    BadRequest,
    LeaseEnded,
    MalformedMessage,
    MigKernelError,
    ReplayedMessage,
    SliceUnavailable,
    UnknownRequest,
)
from ..wire.executor_spec import CONTROL_SENDER, Account, ExecutorSpec
from ..wire.limits import EXECUTOR_FRAME_MAX, check_body, limit_frames
from ..wire.messages import (
    Message,
    decode,
    encode,
    error_body,
    handler_name,
    peek_header,
    refusal,
)
from ..wire.signing import ReplayGuard
from ..wire.transport import (
    BULK_BYTES,
    TCP,
    bind_reserved,
    received,
    send_frames,
    transport_of,
)
from .dataplane import STREAMS, DataPlane, Job, UnknownHandle
from .lanes import Lane, Lanes
from .orphan import OrphanWatch
from .privileges import PrivilegeError, become
from .runtime import Runtime, warm_start

log = logging.getLogger("mig_kernel.executor")
# Plain ints: pyzmq's enum members cost an enum operation per test on the hot path.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)

# Seconds a call runs before the watcher serves the socket in its place
# (MIG_KERNEL_TAKEOVER_US overrides it: the overhead benchmark's diagnosis varies it).
TAKEOVER = float(os.environ.get("MIG_KERNEL_TAKEOVER_US", "2000")) / 1e6
WATCH_IDLE = 1.0  # seconds without calls after which the watcher sleeps until the next one
WATCH_WAIT = 0.1  # seconds the watcher waits for input at most (then it checks the deadline)
AWAITING_WAIT = 0.002  # the same while the main thread looks at the lanes (``_answer_echoes``)
# After a call the main thread polls without sleeping for this long: the holder's next request
# usually follows within microseconds, and a thread (or a VM's vCPU) that went to sleep costs
# tens of microseconds to wake. Not on one CPU (the holder needs it to send that request:
# procs.usable_cpus). MIG_KERNEL_EXECUTOR_SPIN_US overrides it (0: never spin).
SPIN = (
    float(os.environ.get("MIG_KERNEL_EXECUTOR_SPIN_US", "1000" if usable_cpus() >= 2 else "0"))
    / 1e6
)
# MIG_KERNEL_TRACE=1: a lane call's result carries perf_counter_ns stamps of the executor's
# steps (timings["trace"]: read, staged, run, launched, synchronized, ran), for the breakdowns
# of benchmarks/overhead_sweep.py and probes/growth.py (the clock is CLOCK_MONOTONIC, the
# same in the client's process).
TRACE = os.environ.get("MIG_KERNEL_TRACE") == "1"


class ExecutorServer:
    def __init__(self, spec: ExecutorSpec, runtime: Runtime, context: zmq.Context) -> None:
        self.spec = spec
        self.runtime = runtime
        self.control_key = bytes.fromhex(spec.control_key)
        self.tenant_key = bytes.fromhex(spec.tenant_key)
        # Not "now": the broker's ready request was sent while we were still warming up.
        self.guard = ReplayGuard(spec.replay_window, not_before=spec.issued_at or None)
        self.socket = context.socket(zmq.ROUTER)
        self.socket.linger = 1000
        # Checked per frame before any signature can be: an unauthenticated peer (any local
        # user, over tcp) cannot make this process buffer more than one frame of this size.
        limit_frames(self.socket, EXECUTOR_FRAME_MAX)
        # tcp: array data travels in the messages; large frames are received without a copy
        self.zero_copy = transport_of(spec.endpoint) == TCP
        if self.zero_copy and spec.listen_fd is not None:
            bind_reserved(self.socket, spec.endpoint, spec.listen_fd)
        else:
            bind_private(self.socket, spec.endpoint)
        self.served = 0  # tenant requests handled with the current key
        self.touched = False  # any tenant request at all: the executor is no longer pristine
        self.last_active = time.time()
        self.running = True
        self.sealed = False  # spilled for a reclaim: tenant requests are refused
        # A multi-user broker's executor serves nobody until it has become its holder.
        self.holder: Account | None = None
        self.awaiting_holder = spec.multi_user
        self.orphans = OrphanWatch(spec)  # exit once broker and holder are both long gone
        self.lease_id: str | None = None  # the lease whose requests it served (their sender)
        self.streams = self._inproc(context, zmq.PULL, STREAMS)  # bound before it is connected
        self.sock_lock = threading.Lock()
        self.poller = zmq.Poller()
        # What the watcher waits on without holding the socket: their notification fds.
        self.zmq_fds = (self.socket.getsockopt(zmq.FD), self.streams.getsockopt(zmq.FD))
        for sock in (self.socket, self.streams):
            self.poller.register(sock, zmq.POLLIN)
        self.dataplane = DataPlane(runtime, context, spec.memory_limit, self._send_tenant)
        self.dataplane.call_started = self._call_started
        self.dataplane.rehearse = self._rehearse
        self.watch_cond = threading.Condition()
        # The main thread wakes the watcher's wait through this pipe (``_answer_echoes``).
        self.watcher_woken, self.wake_watcher = os.pipe()
        os.set_blocking(self.watcher_woken, False)
        os.set_blocking(self.wake_watcher, False)
        self.watcher_idle = False
        self.stopped = False
        self.watcher = threading.Thread(target=self._watch, name="watcher", daemon=True)
        self.lanes = Lanes()  # the holder's direct streams (lanes.py; ipc executors only)
        self._handlers: dict[tuple[bool, str], Any] = {}  # (control?, type) -> bound method
        self.spin_until = 0.0  # the main thread polls without sleeping until then

    @staticmethod
    def _inproc(context: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
        sock = context.socket(kind)
        sock.linger = 0
        sock.bind(endpoint)
        return sock

    # -- keys --------------------------------------------------------------------------
    def _key_for(self, header: dict[str, Any]) -> bytes | None:
        return self.control_key if header.get("from") == CONTROL_SENDER else self.tenant_key

    # -- loop (main thread) ------------------------------------------------------------
    def serve(self) -> None:
        """Serve and run calls until shutdown (or a rekey that retires this executor)."""
        self.dataplane.runner_ident = threading.get_ident()
        self.watcher.start()
        dataplane = self.dataplane
        while self.running:
            job = dataplane.next_ready() if dataplane.ready else None
            if job is None:
                spinning = time.monotonic() < self.spin_until
                if spinning and self._spin_lanes():
                    continue
                with self.sock_lock:
                    # one request: an invocation runs at once
                    self._serve_turn(0 if spinning else 100, limit=1)
                if self.orphans.orphaned():
                    self._leave_orphaned()
            else:
                self._run(job)
                self.spin_until = time.monotonic() + SPIN

    def _leave_orphaned(self) -> None:
        """Neither broker nor holder for the grace period: save the lease's device data where
        the broker's spill of it would go, then exit (executor/orphan.py)."""
        self.running = False
        self.sealed = True
        if not (self.touched and self.lease_id and self.spec.spill_root):
            log.warning("no broker and no lease holder for %g s: exiting", self.orphans.grace)
            return
        root = Path(self.spec.spill_root)
        path = root / self.holder.user / self.lease_id if self.holder else root / self.lease_id
        try:
            result = self.dataplane.spill(path)
        except Exception:
            log.exception("no broker and no lease holder: could not save %s's data", self.lease_id)
            return
        log.warning(
            "no broker and no lease holder for %g s: saved %d object(s) of lease %s to %s; exiting",
            self.orphans.grace,
            result.get("spilled", 0),
            self.lease_id,
            path,
        )

    def close(self) -> None:
        """Stop the watcher and close every socket (the context can then terminate)."""
        self.stopped = True
        with self.watch_cond:
            self.watch_cond.notify()
        self.watcher.join(timeout=5)
        self.dataplane.close()
        self.streams.close(linger=0)
        self.lanes.close()
        os.close(self.watcher_woken)
        os.close(self.wake_watcher)
        self.socket.close(linger=1000)  # the last replies (a rekey's answer) still go out

    def _run(self, job: Job) -> None:
        streamed = self.dataplane.streamed
        trace = job.body.get("trace") if TRACE else None
        if trace is not None:
            trace.append(time.perf_counter_ns())
        kind, body, payload = self.dataplane.run(job)
        if trace is not None and "timings" in body:
            body["timings"]["trace"] = [*trace, time.perf_counter_ns()]
        lane = self.lanes.by_route.get(job.route) if isinstance(job.route, str) else None
        # Nothing of this call waits to go before its result: it leaves at once, whoever
        # holds the ZeroMQ socket (no hand-off from the watcher on the way out).
        if (
            lane is not None
            and self.dataplane.streamed == streamed
            and lane.send(lane_wire.pack(kind, body, payload))
        ):
            return
        frames = self._encode_for(job.route, kind, body, payload)
        self.sock_lock.acquire()  # the watcher holds it only while it handles something
        try:
            if self.dataplane.streamed != streamed:
                self._forward_streams()  # what the call printed goes before its result
            self._deliver(job.route, frames)
        finally:
            self.sock_lock.release()

    # -- lanes ------------------------------------------------------------------------------
    def _encode_for(self, route: Any, kind: str, body: dict[str, Any], payload: Any = ()) -> Any:
        """A message to the lease holder, ready for ``_deliver``: packed for a lane, signed
        frames for a ZeroMQ route."""
        if isinstance(route, str):
            return lane_wire.pack(kind, body, payload)
        return self._sign_tenant(kind, body, payload)

    def _deliver(self, route: Any, encoded: Any) -> None:
        """Send what ``_encode_for`` made (the caller holds ``sock_lock``). A lane that broke,
        or is gone, hands the message to the ZeroMQ route that opened it."""
        if not isinstance(route, str):
            self._send_frames([route, *encoded])
            return
        lane = self.lanes.by_route.get(route)
        if lane is not None and lane.send(encoded):
            return
        zmq_route = lane.zmq_route if lane is not None else None
        if zmq_route is None:
            log.warning("a reply for %s, which is gone, was dropped", route)
            return
        kind, body, payload = _unpack(encoded)
        if "value" in body:  # a plain result, as a lane carries it: ZeroMQ carries its pickle
            body["data"] = pickle.dumps(body.pop("value"), protocol=pickle.HIGHEST_PROTOCOL)
        self._send_frames([zmq_route, *self._sign_tenant(kind, body, payload)])

    def _spin_lanes(self) -> bool:
        """Until ``spin_until``, look at the lanes without sleeping; True when a request came
        by one and was served. False, to poll everything, when the spin ends or the ZeroMQ
        socket has a message, and at once if the watcher is handling something."""
        if not self.sock_lock.acquire(blocking=False):
            return False
        try:
            lanes, clock = self.lanes.by_route, time.monotonic
            events = self.socket.getsockopt
            i = 0
            while True:
                for lane in lanes.values():
                    read = time.perf_counter_ns() if TRACE else 0
                    try:
                        message = lane.reader.next(False)
                    except lane_wire.LaneBroken:
                        self._drop_lane(lane)
                        return True
                    if message is not None:
                        self._serve_request(lane, message, read)
                        if lane.reader.buffered():
                            self._serve_lane(lane, wait=False)
                        return True
                i += 1
                if i % 64 == 0 and (
                    not lanes or clock() >= self.spin_until or events(_EVENTS) & _POLLIN
                ):
                    return False
        finally:
            self.sock_lock.release()

    def _serve_lane(self, lane: Lane, wait: bool = True) -> bool:
        """The requests a lane has brought (the caller holds ``sock_lock``); without
        ``wait``, False if none had come. Every whole request read is served: the socket
        shows nothing more for those read together with the first."""
        reader = lane.reader
        while True:
            read = time.perf_counter_ns() if TRACE else 0
            try:
                message = reader.next(wait)
            except lane_wire.LaneBroken:
                self._drop_lane(lane)
                return True
            if message is None:
                return False
            self._serve_request(lane, message, read)
            if not reader.buffered():
                return True

    def _serve_request(self, lane: Lane, message: tuple[Any, ...], read: int = 0) -> None:
        """One request read from a lane (``read``: when, for ``MIG_KERNEL_TRACE``)."""
        kind, body, payload = message
        if TRACE and kind == "invoke":
            body["trace"] = [read]
        job = self._lane_job(lane, body) if kind == "invoke" and not payload else None
        if job is not None:  # the usual call, in fewer steps
            self.orphans.note_tenant()
            self._tenant_served(None)
            self.dataplane.queue(job)
        else:  # The kernel vouches for the sender: no signature, timestamp or replay check.
            self._dispatch(lane.route, Message(kind, body, b"", 0.0, payload=list(payload)))
        if TRACE and kind == "invoke":
            body["trace"].append(time.perf_counter_ns())

    def _lane_job(self, lane: Lane, body: dict[str, Any], free_now: bool = True) -> Job | None:
        """The usual invocation by a lane, checked and staged in fewer steps than
        ``_dispatch``, ``tenant_invoke``, ``_job`` and ``submit`` take (on a short call every
        step counts: docs/performance.md): no frames, plain arguments in the lane's pickle or
        none, a function this executor has loaded already, handle numbers where it holds
        those handles, handles to free as a list of ints (freed once the request passed its
        checks, as the usual path frees them). The job is the one the usual path would queue;
        nothing else is changed but the function cache's order (a rehearsal makes one too).
        Anything else, or anything these checks refuse, is None: the usual path serves it, or
        names what is wrong (freeing again what was freed here changes nothing). A
        rehearsal (``free_now`` False) frees nothing."""
        if self.awaiting_holder or self.sealed:
            return None
        argv = body.get("argv")
        if argv is None:
            if body.get("args") != payload_wire.EMPTY_ARGS:
                return None
            staged: Any = ((), {})
        elif (
            type(argv) is tuple
            and len(argv) == 2
            and type(argv[0]) is tuple
            and type(argv[1]) is dict
        ):
            staged = argv
        else:
            return None
        handles = body.get("handles")
        if handles is not None and (argv is None or not _handle_positions(argv, handles)):
            return None
        call_id, fn_data, timeout = body.get("call_id"), body.get("fn"), body.get("timeout")
        if (
            type(call_id) is not str
            or type(fn_data) is not bytes
            or not (timeout is None or (type(timeout) in (int, float) and timeout > 0))
        ):
            return None
        fn = self.dataplane.function(fn_data, load=False, use=True)
        if fn is None:
            return None
        free = body.get("free")
        if free is not None and (type(free) is not list or any(type(i) is not int for i in free)):
            return None
        try:
            check_body(body)
            if free and free_now:
                self.dataplane.free(free)
            if handles:
                staged = self.dataplane.lookup_at(argv, handles)
        except (BadRequest, UnknownHandle):
            return None
        job = Job(
            "invoke", lane.route, call_id, body, b"", fn_data, argv=argv, handles=handles, fn=fn
        )
        job.staged, job.ready_event = staged, self.dataplane.last_copy
        return job

    def _accept_lane(self) -> None:
        lane = self.lanes.accept()
        if lane is not None:
            self.poller.register(lane, zmq.POLLIN)

    def _drop_lane(self, lane: Lane) -> None:
        with contextlib.suppress(KeyError):
            self.poller.unregister(lane)
        self.lanes.drop(lane)

    def _serve_turn(self, timeout_ms: int, limit: int) -> None:
        """One poll of the sockets and what came (the caller holds ``sock_lock``)."""
        events = dict(self.poller.poll(timeout_ms))
        if self.streams in events:
            self._forward_streams()
        if self.lanes.listener is not None:  # plain sockets come back as their fds
            listener = self.lanes.listener.fileno()
            for ready in events:
                if ready == listener:
                    self._accept_lane()
                elif isinstance(ready, int) and ready in self.lanes.by_fd:
                    self._serve_lane(self.lanes.by_fd[ready])
        if self.socket in events:
            for i in range(limit):
                self._handle(*self._receive())
                if i + 1 == limit or not self.socket.getsockopt(_EVENTS) & _POLLIN:
                    break
        self._check_deadline()

    def _forward_streams(self) -> None:
        """What running calls printed or displayed ("stream", "display"), in order."""
        while self.streams.getsockopt(_EVENTS) & _POLLIN:
            route, kind, body = self.streams.recv_pyobj()
            self._deliver(route, self._encode_for(route, kind, body))

    def _rehearse(self, working: Callable[[], bool]) -> None:
        """Run again, to no effect, the steps that follow the running call and read the next
        request (the data plane calls it while the call's GPU work runs; dataplane.REHEARSE
        says why): the client's rehearsal of a round trip answered, if it came (an echo,
        wire/lane.py ``answer_echo``; else a receive that reads nothing), the latest request
        the lane brought, unpickled, checked, made a job and its function looked up; and a
        result's pickle. Besides the echo's answer nothing is sent, queued or changed.
        Between those parts it asks ``working`` (is the GPU work still running?) and stops
        when it has ended: the end is noticed within a part, not a whole rehearsal (tens of
        us after a slow phase of the host)."""
        job = self.dataplane.current
        lane = self.lanes.by_route.get(job.route) if job is not None else None
        if lane is None:  # a ZeroMQ route: no lane
            return
        self._answer_echoes()
        last = lane.reader.last
        if not last or not working():
            return
        message = lane_wire.whole_message(last)
        if message is None or message[0] != "invoke":
            return
        kind, body, payload = message
        if payload or self._lane_job(lane, body, free_now=False) is None:  # the usual path
            try:
                check_body(body)
                msg = Message(type=kind, body=body, id=b"", ts=0.0, payload=list(payload))
                fn_data = self._job(kind, msg, job.route, True).fn_data
            except MigKernelError:  # a request refused when it came: nothing to rehearse
                return
            if fn_data:
                self.dataplane.function(fn_data, load=False)
        if not working():
            return
        timings = {"stage_in_ms": 0.0, "compute_ms": 0.0, "input_bytes": 0}
        lane_wire.pack("result", {"call_id": job.call_id, "timings": timings, "value": None})

    def _answer_echoes(self) -> None:
        """While the main thread waits for GPU work the watcher leaves the lanes to it (a
        thread woken for every echo would take the GIL from it): it answers their echoes
        here, and wakes the watcher for anything else that came."""
        if not self.sock_lock.acquire(blocking=False):  # the watcher is serving something
            return
        try:
            for lane in self.lanes.by_route.values():
                # (bytes of its own buffered: the socket's next ones are not a message's first)
                if lane.reader.rest or lane_wire.answer_echo(lane.sock, lane.send) is False:
                    with contextlib.suppress(BlockingIOError):  # (full: it is woken already)
                        os.write(self.wake_watcher, b"\0")
                    return
        finally:
            self.sock_lock.release()

    # -- the watcher thread --------------------------------------------------------------
    def _call_started(self) -> None:
        """Called by the main thread as a call starts: wake the watcher if it sleeps."""
        if self.watcher_idle:
            with self.watch_cond:
                self.watch_cond.notify()

    def _watch(self) -> None:
        """Serve the socket while a call runs for longer than ``TAKEOVER``. It looks every
        ``TAKEOVER`` seconds while calls come, and sleeps until the next call after a second
        without any (no wake-up per call on the main thread's path)."""
        while not self.stopped:
            try:
                self._watch_once()
            except Exception:  # a bug: the watcher must outlive it, or long calls go unserved
                log.exception("watcher failed; going on")
                time.sleep(0.1)

    def _watch_once(self) -> None:
        job = self.dataplane.current
        if job is None:
            if time.time() - self.dataplane.last_active > WATCH_IDLE:
                self._sleep_until_a_call()
            else:
                time.sleep(TAKEOVER)
            return
        wait = job.run_started + TAKEOVER - time.monotonic()
        if wait > 0:
            time.sleep(wait)
            return
        self._serve_during(job)
        if not self.running:
            self._exit_after(job)

    def _serve_during(self, job: Job) -> None:
        """Serve the sockets while ``job`` runs. The socket is held only while what came is
        handled, never while waiting for it: the main thread takes it back the moment the
        call ends, with no hand-off (which cost two thread wake-ups after every long call).
        The wait is on the sockets' fds (ZeroMQ's notification fds, the lanes, the lane
        listener), which any thread may poll."""
        # A turn only for what came: while the main thread waits for the call's GPU work it
        # answers the lanes' echoes itself and wakes this thread for anything else, and a
        # turn taken then (tens of us holding the GIL, at the takeover and at each timeout
        # of the wait below) delays its noticing the end of that work by as much: on an
        # H100, calls of 2.1 ms, ending just after the takeover, were 50 us late.
        serve = not self.dataplane.awaiting
        while self.dataplane.current is job and self.running and not self.stopped:
            with self.sock_lock:
                if self.dataplane.current is not job:
                    return
                # (The fds signal new arrivals only: what waits already is seen here.)
                if serve or self._zmq_input_waiting():
                    self._serve_turn(0, limit=64)
                    if self._zmq_input_waiting():
                        continue  # more than one turn takes
                else:
                    self._check_deadline()
                fds = [*self.zmq_fds, self.watcher_woken]
                # While the main thread rehearses, the lanes are its to look at (it wakes
                # this wait for what it does not answer itself); the wait is then shorter,
                # so that the lanes are this thread's again soon after the GPU work ends.
                awaiting = self.dataplane.awaiting
                if not awaiting:
                    fds.extend(self.lanes.by_fd)
                if self.lanes.listener is not None:
                    fds.append(self.lanes.listener.fileno())
            waiting = select.poll()
            for fd in fds:
                waiting.register(fd, select.POLLIN)
            came = waiting.poll(AWAITING_WAIT * 1000 if awaiting else WATCH_WAIT * 1000)
            if came:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.watcher_woken, 512)
            serve = bool(came) or not self.dataplane.awaiting

    def _zmq_input_waiting(self) -> bool:
        """Whether the ROUTER or the output streams hold input now (the caller holds
        ``sock_lock``)."""
        return bool((self.socket.getsockopt(_EVENTS) | self.streams.getsockopt(_EVENTS)) & _POLLIN)

    def _sleep_until_a_call(self) -> None:
        with self.watch_cond:
            self.watcher_idle = True
            while self.dataplane.current is None and not self.stopped:
                self.watch_cond.wait()
            self.watcher_idle = False

    def _exit_after(self, job: Job, grace: float = 5.0) -> None:
        """Shut down while a call runs: it may finish for a while, then the process goes
        (Python cannot interrupt it)."""
        deadline = time.monotonic() + grace
        while self.dataplane.current is job and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.dataplane.current is job:
            logging.shutdown()
            os._exit(0)

    def _send_frames(self, frames: list[Any]) -> None:
        """Send [route, *signed frames]; large frames (arrays) without a copy."""
        bulk = any(len(frame) >= BULK_BYTES for frame in frames[3:])
        send_frames(self.socket, frames, copy=not bulk)

    def _receive(self) -> tuple[bytes, list[Any]]:
        if self.zero_copy:
            # [route, signature, header, fn, args, *array buffers]
            frames = received(self.socket.recv_multipart(copy=False), 3)
        else:
            frames = self.socket.recv_multipart(copy=True)
        return frames[0], frames[1:]

    def _sign_tenant(self, kind: str, body: dict[str, Any], payload: Any = ()) -> list[Any]:
        """A message to the lease holder, signed with the current tenant key (any thread)."""
        return encode(kind, body, self.tenant_key, sender="executor", payload=payload)

    def _send_tenant(self, route: Any, kind: str, body: dict[str, Any], payload: Any) -> None:
        """The data plane's replies from the thread holding the socket."""
        self._deliver(route, self._encode_for(route, kind, body, payload))

    def _check_deadline(self) -> None:
        """A call past its timeout cannot be stopped inside Python: the caller is told, and the
        executor exits so the broker replaces it (the lease keeps its slice)."""
        job = self.dataplane.current
        if job is None or time.time() <= job.deadline:
            return
        body = {
            "call_id": job.call_id,
            "type": "TimeoutError",
            "module": "builtins",
            "message": "the call exceeded its timeout; the executor was stopped and is being "
            "replaced, and this lease's device arrays are lost",
            "traceback": "",
        }
        route = job.route
        if isinstance(route, str):  # a lane: its send is done when it returns
            lane = self.lanes.by_route.get(route)
            if lane is not None and lane.send(lane_wire.pack("error", body)):
                route = None
            else:
                route = lane.zmq_route if lane is not None else None
        if route is not None:
            # Tracked (zero-copy: small copied frames are never tracked), and waited for:
            # os._exit would otherwise drop a message still queued.
            self.socket.copy_threshold = 0
            tracker = self.socket.send_multipart(
                [route, *self._sign_tenant("error", body)], copy=False, track=True
            )
            with contextlib.suppress(zmq.NotDone):
                tracker.wait(1.0)
        log.error("call %s timed out; exiting so the broker replaces this executor", job.call_id)
        self.socket.close(linger=1000)
        os._exit(70)

    def _handle(self, route: bytes, frames: list[Any]) -> None:
        msg = self._open(route, frames)
        if msg is None:
            return
        self._dispatch(route, msg)

    def _dispatch(self, route: Any, msg: Message) -> None:
        """Run a verified request's handler and answer it (``route``: ZeroMQ or a lane)."""
        control = msg.sender == CONTROL_SENDER
        key = self.control_key if control else self.tenant_key
        if control:
            self.orphans.note_control(msg.type, msg.body)
        else:
            self.orphans.note_tenant()
        try:
            check_body(msg.body)
            method = self._handlers.get((control, msg.type))
            if method is None:
                name = handler_name("control" if control else "tenant", msg.type)
                method = getattr(self, name, None)
                if method is not None:
                    self._handlers[control, msg.type] = method
            if method is None:
                raise UnknownRequest(f"unknown request type {msg.type!r}")
            if not control:
                if self.awaiting_holder:
                    raise SliceUnavailable(
                        "this slice is still being prepared for its holder; try again"
                    )
                if self.sealed:
                    raise LeaseEnded(
                        "the slice was reclaimed (its device data was saved for a restore); "
                        "lease again",
                        reason="reclaimed",
                    )
                self._tenant_served(msg.sender)
            body = method(msg, route)
            if body is not None:
                self._send(route, "reply", body, key, msg.id)
        except MigKernelError as exc:
            self._send(route, "error", self._error_body(exc, msg), key, msg.id)
        except Exception as exc:  # a bug: report it and keep serving
            log.exception("request failed")
            self._send(route, "error", self._error_body(exc, msg), key, msg.id)

    def _tenant_served(self, sender: str | None) -> None:
        """A tenant's request passed its checks: the executor is touched, and active now."""
        self.touched = True
        if sender:  # (a lane request has none: its lane was opened by a signed one)
            self.lease_id = sender
        self.served += 1
        self.last_active = time.time()

    def _open(self, route: bytes, frames: list[Any]) -> Message | None:
        """Verify a request. What cannot be authenticated gets an unsigned refusal (we sign
        nothing for a peer that does not share a key); a replay of a genuine message gets an
        error signed with its sender's key, so the sender can tell it apart from a forgery."""
        try:
            return decode(frames, self._key_for, self.guard)
        except ReplayedMessage as exc:
            header = peek_header(frames)  # the signature was checked before the replay
            key = self._key_for(header)
            self._send(route, "error", error_body(exc), key or self.control_key, header["id"])
        except (AuthenticationError, MalformedMessage) as exc:
            self.socket.send_multipart([route, *refusal(str(exc))])
        except Exception as exc:  # a bug in the checks themselves: refuse, keep serving
            log.exception("could not read a request")
            self.socket.send_multipart([route, *refusal(f"unreadable request: {exc}")])
        return None

    @staticmethod
    def _error_body(exc: Exception, msg: Message | None) -> dict[str, Any]:
        """An error reply, carrying the call id so the caller's future gets it."""
        body = error_body(exc)
        if msg is not None and isinstance(msg.body.get("call_id"), str):
            body["call_id"] = msg.body["call_id"]
        return body

    def _send(self, route: Any, kind: str, body: dict, key: bytes, re: bytes | None) -> None:
        if isinstance(route, str):  # a lane (only tenant requests come by one)
            self._deliver(route, lane_wire.pack(kind, body))
            return
        send_frames(self.socket, [route, *encode(kind, body, key, sender="executor", re=re)])

    # -- control requests ----------------------------------------------------------------
    def control_ready(self, msg: Message, route: bytes) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "executor_id": self.spec.executor_id,
            "runtime": self.runtime.name,
            "warm_seconds": self.runtime.warm_seconds,
            "device": self.runtime.device,
            "holder": self.holder.user if self.holder is not None else None,
        }

    def control_rekey(self, msg: Message, route: bytes) -> dict[str, Any]:
        if self.touched:
            self.running = False  # it served a tenant: never reused for the next one
            return {"pristine": False}
        self.tenant_key = bytes.fromhex(msg.body["key"])
        return {"pristine": True}

    def control_become(self, msg: Message, route: bytes) -> dict[str, Any]:
        """Become the lease holder for good (multi-user brokers; see privileges.py). A failure
        leaves the executor unusable: the broker kills it and grants nothing from it."""
        if not self.awaiting_holder:
            raise BadRequest("this executor already serves a holder (or serves one user only)")
        try:
            holder = Account.from_json(msg.body)
        except ValueError as exc:
            raise BadRequest(f"become: {exc}") from None
        socket_path = None
        if self.spec.endpoint.startswith("ipc://"):
            socket_path = self.spec.endpoint[len("ipc://") :]
        try:
            become(holder, socket_path)
        except PrivilegeError as exc:
            self.running = False
            raise BadRequest(str(exc)) from None
        self.holder, self.awaiting_holder = holder, False
        self.touched = True  # it is the holder's process now: never reused for anyone else
        try:
            self.runtime.follow_home(holder.home)
        except Exception:  # compiles may fail later; the holder's calls will say why
            log.exception("could not move CuPy's kernel cache to %s's home", holder.user)
        log.info(
            "executor %s now runs as %s (uid %d)", self.spec.executor_id, holder.user, holder.uid
        )
        return {"uid": os.getuid(), "gid": os.getgid(), "user": holder.user}

    def control_stats(self, msg: Message, route: bytes) -> dict[str, Any]:
        running = self.dataplane.current
        now = time.monotonic()
        busy_seconds = self.dataplane.busy_seconds
        if running is not None and running.run_started:
            # The running call's time so far: a long call shows as busy while it runs (the
            # panel's "computing"), not only once it ends.
            busy_seconds += max(0.0, now - running.run_started)
        return {
            "last_active": time.time()
            if running is not None
            else max(self.last_active, self.dataplane.last_active),
            "served": self.served,
            "memory_used": self.dataplane.memory_used(),
            "busy_seconds": busy_seconds,
            "at": now,
        }

    def control_spill(self, msg: Message, route: bytes) -> dict[str, Any]:
        # From now on the tenant's requests are refused: a call that ran after the spill
        # would change data that is no longer the data the restore brings back.
        self.sealed = True
        return self.dataplane.spill(Path(msg.body["path"]))

    def control_restore(self, msg: Message, route: bytes) -> dict[str, Any]:
        result = self.dataplane.restore(Path(msg.body["path"]))
        self.touched = True  # it holds a tenant's data now
        return result

    def control_shutdown(self, msg: Message, route: bytes) -> dict[str, Any]:
        self.running = False
        return {}

    # -- tenant requests -----------------------------------------------------------------
    def tenant_ping(self, msg: Message, route: bytes) -> dict[str, Any]:
        return {
            "call_id": msg.body.get("call_id"),  # a waiting client's liveness probe is named
            "pid": os.getpid(),
            "slice": self.spec.slice.get("id"),
            "runtime": self.runtime.name,
            "warm_seconds": self.runtime.warm_seconds,
            "device": self.runtime.device,
            "memory_limit": self.spec.memory_limit,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def tenant_echo(self, msg: Message, route: bytes) -> dict[str, Any]:
        """A waiting client's rehearsal of a round trip (wire/lane.py ``ECHO``) that came when
        no call's GPU work was being waited for: answered as ``answer_echo`` would."""
        return {"call_id": msg.body.get("call_id")}

    def tenant_lane(self, msg: Message, route: Any) -> dict[str, Any]:
        """Offer a lane (wire/lane.py): an abstract socket's name and a one-time token."""
        if isinstance(route, str):
            raise BadRequest("a lane is opened over the executor's ZeroMQ socket")
        if self.zero_copy:
            raise BadRequest("no lane on a tcp executor: its clients may be on other hosts")
        address, token = self.lanes.offer(route)
        if self.lanes.listener is not None and self.lanes.listener not in self._polled():
            self.poller.register(self.lanes.listener, zmq.POLLIN)
        return {"call_id": msg.body.get("call_id"), "address": address, "token": token}

    def _polled(self) -> list[Any]:
        return [sock for sock, _ in self.poller.sockets]

    # -- data plane: staged here, run by the main thread, answered from there ---------------
    def _job(self, kind: str, msg: Message, route: bytes, needs_payload: bool) -> Job:
        call_id = msg.body.get("call_id")
        if not isinstance(call_id, str):
            raise BadRequest("field 'call_id' is required")
        timeout = msg.body.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise BadRequest(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not needs_payload:
            return Job(kind, route, call_id, msg.body)
        fn_data, data = msg.body.get("fn"), msg.body.get("args")
        if isinstance(fn_data, bytes) and isinstance(data, bytes):  # small: in the header
            return Job(kind, route, call_id, msg.body, data, fn_data, msg.payload)
        argv = msg.body.get("argv")
        if argv is not None and isinstance(fn_data, bytes) and isinstance(route, str):
            # Plain arguments in the lane's own pickle (remote.py's _plain_arguments), and handle
            # numbers in place of handles (its _handle_arguments).
            if not (
                type(argv) is tuple
                and len(argv) == 2
                and type(argv[0]) is tuple
                and type(argv[1]) is dict
            ):
                raise BadRequest("field 'argv' is (args, kwargs): a tuple and a dict")
            handles = msg.body.get("handles")
            if handles is not None and not _handle_positions(argv, handles):
                raise BadRequest(
                    "field 'handles' lists the positions of argv that hold handle numbers: "
                    "indexes into args and keywords, each holding an int"
                )
            return Job(
                kind,
                route,
                call_id,
                msg.body,
                b"",
                fn_data,
                msg.payload,
                argv=argv,
                handles=handles,
            )
        if len(msg.payload) < 2:
            raise BadRequest(
                "an invocation carries the function and its arguments (the body's fn and args, "
                "or two frames), then the array data it names, if any"
            )
        fn_data, data = msg.payload[:2]
        return Job(kind, route, call_id, msg.body, data, fn_data, msg.payload[2:])

    def tenant_invoke(self, msg: Message, route: bytes) -> None:
        if "free" in msg.body:
            self._free_carried(msg)
        self.dataplane.submit(self._job("invoke", msg, route, True))

    def _free_carried(self, msg: Message) -> None:
        """Handles the client collected since its last call travel in the call's ``free``
        field (one message fewer per call); freed first, so a call that is refused for
        another reason still frees them."""
        ids = msg.body.get("free")
        if ids is None:
            return
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise BadRequest("free needs ids: [int, ...]")
        self.dataplane.free(ids)

    def tenant_call(self, msg: Message, route: bytes) -> None:
        self._free_carried(msg)
        if msg.body.get("op") not in ("alloc", "put", "launch"):
            raise BadRequest(f"unknown call {msg.body.get('op')!r}: expected alloc, put or launch")
        self.dataplane.submit(self._job("call", msg, route, True))

    def tenant_fetch(self, msg: Message, route: bytes) -> None:
        items = msg.body.get("items")
        if not isinstance(items, list) or not all(_fetch_item(i) for i in items):
            raise BadRequest(
                "fetch needs items [[handle, segment, offset, nbytes], ...] (into the arena) or "
                "[[handle, nbytes], ...] (back in the reply)"
            )
        self.dataplane.fetch(self._job("fetch", msg, route, False))

    def tenant_cancel(self, msg: Message, route: bytes) -> dict[str, Any]:
        call_id = msg.body.get("target")
        if not isinstance(call_id, str):
            raise BadRequest("cancel needs target: the call id to cancel")
        # No call id in the reply: nobody waits for it (the caller waits for the call itself).
        return {"cancelled": self.dataplane.cancel(call_id)}

    def tenant_reset(self, msg: Message, route: bytes) -> dict[str, Any]:
        return {"call_id": msg.body.get("call_id"), "freed": self.dataplane.reset()}

    def tenant_free(self, msg: Message, route: bytes) -> dict[str, Any]:
        ids = msg.body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise BadRequest("free needs ids: [int, ...]")
        self.dataplane.free(ids)
        return {"freed": len(ids)}


def _handle_positions(argv: tuple[tuple[Any, ...], dict[str, Any]], handles: Any) -> bool:
    """Whether a lane request's ``handles`` field is what remote.py's ``_handle_arguments``
    sends: a list of positions in ``argv`` (indexes into args, keywords), each holding an int
    (a handle number)."""
    if type(handles) is not list:
        return False
    args, kwargs = argv
    for at in handles:  # (a loop, not all() of a generator: a short call's every step counts)
        if type(at) is int:
            if not (0 <= at < len(args) and type(args[at]) is int):
                return False
        elif not (type(at) is str and type(kwargs.get(at)) is int):
            return False
    return True


def _unpack(packed: bytes) -> tuple[str, dict[str, Any], tuple[Any, ...]]:
    """A packed lane message taken apart again (to send it by ZeroMQ instead)."""
    kind, body, payload = pickle.loads(packed[lane_wire.HEADER_BYTES :])
    return kind, body, payload


def _fetch_item(item: Any) -> bool:
    """[handle, segment, offset, nbytes] or [handle, nbytes], all ints but the segment path."""
    if not isinstance(item, list) or len(item) not in (2, 4):
        return False
    numbers = [item[0], item[-1], *item[2:3]]
    ok = all(isinstance(n, int) and n >= 0 for n in numbers)
    return ok and (len(item) == 2 or isinstance(item[1], str))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s executor %(levelname)s %(message)s")
    spec = ExecutorSpec.from_json(sys.stdin.read())
    sys.stdin.close()
    runtime = warm_start(spec.runtime, spec.memory_limit)
    log.info(
        "executor %s warm in %.3f s (%s)", spec.executor_id, runtime.warm_seconds, runtime.name
    )
    context = zmq.Context()
    server = ExecutorServer(spec, runtime, context)
    server.serve()
    server.close()
    context.term()
    return 0
