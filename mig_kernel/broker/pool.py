"""Executor processes: start, adopt after a broker restart, talk to, watch, stop.

The pool knows processes and sockets; which slice gets which executor and when is the broker's
decision. Every socket here is a DEALER connected to one executor's ROUTER; replies come back as
events (``ready``, ``rekeyed``, ``stats``) that the broker loop handles.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from ..procs import proc_start_ticks
from ..slices.model import SliceInfo
from ..wire.errors import AuthenticationError, MigKernelError
from ..wire.executor_spec import CONTROL_SENDER, ExecutorSpec
from ..wire.limits import CONTROL_QUEUE, CONTROL_REPLY_MAX, limit_frames
from ..wire.messages import Message, decode, encode, refusal_reason
from ..wire.paths import unlink_quietly
from ..wire.signing import new_key
from ..wire.transport import IPC, TCP, reserve_tcp_port
from .registry import EXECUTOR_MODULE, TAG_OPTION
from .state import Executor, new_id

log = logging.getLogger("mig_kernel.broker")


class ExecutorPool:
    def __init__(
        self,
        context: zmq.Context,
        runtime_dir: Path,
        log_dir: Path,
        *,
        python: str = sys.executable,
        start_timeout: float = 120.0,
        replay_window: float = 30.0,
        transport: str = IPC,
        multi_user: bool = False,
        env_keep: tuple[str, ...] = (),
        tag: str = "",
        orphan_grace: float = 0.0,
        spill_root: str = "",
    ) -> None:
        self.context = context
        self.runtime_dir = runtime_dir
        self.log_dir = log_dir
        self.python = python
        self.start_timeout = start_timeout
        self.replay_window = replay_window
        self.transport = transport  # of the executors started from now on (adopted keep theirs)
        self.multi_user = multi_user  # executors become their holder before serving them
        self.env_keep = env_keep  # names (or NAME* prefixes) of broker variables executors get
        self.tag = tag  # on executors' command lines: registry.py finds them by it
        self.orphan_grace = orphan_grace  # seconds an executor waits without broker and holder
        self.spill_root = spill_root  # where an orphaned executor saves its lease's data
        # Who the executors' broker is: an executor without it (and without a live holder)
        # for orphan_grace seconds exits (executor/orphan.py).
        self.broker = {"broker_pid": os.getpid(), "broker_ticks": proc_start_ticks(os.getpid())}
        self.by_socket: dict[zmq.Socket, Executor] = {}
        self.pending: dict[bytes, tuple[str, Executor]] = {}  # msg id -> (request type, executor)

    # -- starting ------------------------------------------------------------------------
    def spawn(self, info: SliceInfo, tenant_key: bytes, key_lease: str | None) -> Executor:
        executor_id = new_id("E")
        listener = None
        if self.transport == TCP:
            listener, endpoint = reserve_tcp_port()
        else:
            endpoint = f"ipc://{self.runtime_dir / (executor_id + '.sock')}"
        ex = Executor(
            id=executor_id,
            slice_id=info.id,
            endpoint=endpoint,
            control_key=new_key(),
            tenant_key=tenant_key,
            key_lease=key_lease,
        )
        try:
            self._start_process(ex, info, listener.fileno() if listener else None)
        finally:
            if listener is not None:
                listener.close()  # the executor holds the port now; ours would keep it open
        self._connect(ex, self.start_timeout)
        return ex

    def _start_process(self, ex: Executor, info: SliceInfo, listen_fd: int | None) -> None:
        spec = ExecutorSpec(
            executor_id=ex.id,
            endpoint=ex.endpoint,
            control_key=ex.control_key.hex(),
            tenant_key=ex.tenant_key.hex(),
            slice=info.to_json(),
            runtime=info.runtime,
            memory_limit=info.memory_limit,
            replay_window=self.replay_window,
            issued_at=time.time(),
            listen_fd=listen_fd,
            multi_user=self.multi_user,
            orphan_grace=self.orphan_grace,
            spill_root=self.spill_root,
            **self.broker,
        )
        env = self._environment()
        env.update(info.env)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_dir / f"{info.id}.log", "ab") as logfile:
            ex.popen = subprocess.Popen(
                [self.python, "-m", EXECUTOR_MODULE, *((TAG_OPTION, self.tag) if self.tag else ())],
                stdin=subprocess.PIPE,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C at the broker's terminal is the broker's
                close_fds=True,
                cwd="/",  # `python -m` imports from its cwd first: never the broker's
                pass_fds=(listen_fd,) if listen_fd is not None else (),
            )
        assert ex.popen.stdin is not None
        ex.popen.stdin.write(spec.to_json().encode())
        ex.popen.stdin.close()
        ex.pid = ex.popen.pid
        ex.start_ticks = proc_start_ticks(ex.pid)

    def _environment(self) -> dict[str, str]:
        """The executor's environment. A single-user broker's executors run as its user and
        get its environment; a multi-user broker's run tenant code, so they get only the
        variables named in ``env_keep`` (never, say, a hub API token the service holds)."""
        if not self.multi_user:
            return dict(os.environ)
        keep = {}
        for name, value in os.environ.items():
            for pattern in self.env_keep:
                if name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1])):
                    keep[name] = value
                    break
        return keep

    def adopt(self, record: dict[str, Any], adopt_timeout: float = 10.0) -> Executor | None:
        """Reconnect to an executor a previous broker process started; None if it is gone."""
        ticks = proc_start_ticks(record["pid"])
        if ticks is None or (record["start_ticks"] is not None and ticks != record["start_ticks"]):
            return None
        ex = Executor(
            id=record["id"],
            slice_id=record["slice_id"],
            endpoint=record["endpoint"],
            control_key=record["control_key"],
            tenant_key=record["tenant_key"],
            key_lease=record["key_lease"],
            pid=record["pid"],
            start_ticks=ticks,
            adopted=True,
        )
        self._connect(ex, adopt_timeout)
        return ex

    def _connect(self, ex: Executor, timeout: float) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.RECONNECT_IVL, 10)  # the executor binds once warm; notice it fast
        # Control replies are small; on a multi-user node the executor runs its tenant's code
        # and may say anything: a larger message drops the connection instead of the memory.
        limit_frames(sock, CONTROL_REPLY_MAX)
        # A hung or stopped executor reads nothing: a short queue, and sends that never wait
        # (``_send``), so the broker's loop never blocks on one executor.
        sock.setsockopt(zmq.SNDHWM, CONTROL_QUEUE)
        sock.connect(ex.endpoint)
        ex.socket = sock
        ex.phase = "starting"
        ex.deadline = time.time() + timeout
        self.by_socket[sock] = ex
        self._send(ex, "ready", dict(self.broker))

    # -- requests ------------------------------------------------------------------------
    def _send(self, ex: Executor, msg_type: str, body: dict[str, Any]) -> bool:
        """Queue a request without ever waiting. False if the executor's queue is full (it
        has not read for ``CONTROL_QUEUE`` requests): it counts as not answering from then on
        (executor_watch.py replaces it once that lasts)."""
        assert ex.socket is not None
        msg_id = os.urandom(16)
        frames = encode(msg_type, body, ex.control_key, sender=CONTROL_SENDER, msg_id=msg_id)
        try:
            ex.socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("executor %s does not read its requests; %s not sent", ex.id, msg_type)
            if ex.awaiting_since is None:
                ex.awaiting_since = time.time()
            return False
        self.pending[msg_id] = (msg_type, ex)
        return True

    def rekey(self, ex: Executor, timeout: float = 5.0) -> None:
        ex.pending_key = new_key()
        ex.phase = "rekeying"
        ex.deadline = time.time() + timeout
        self._send(ex, "rekey", {"key": ex.pending_key.hex()})

    def request(self, ex: Executor, msg_type: str, body: dict[str, Any]) -> None:
        """Any other control request (become, spill, restore); its reply arrives as an event."""
        self._send(ex, msg_type, body)

    def request_stats(self, ex: Executor, holder: dict[str, Any] | None = None) -> None:
        """Ask for activity and memory, unless an earlier stats request is still unanswered
        (one outstanding per executor); the oldest unanswered one dates ``awaiting_since``.
        ``holder`` (``holder_pid``, ``holder_ticks``) tells the executor which process holds
        its lease (executor/orphan.py)."""
        if ex.stats_outstanding:
            return
        if self._send(ex, "stats", holder or {}):
            ex.stats_outstanding = True
            if ex.awaiting_since is None:
                ex.awaiting_since = time.time()

    def awaits_other(self, ex: Executor) -> bool:
        """Whether a request other than stats is outstanding (a spill, restore or become may
        keep the executor from answering for as long as it takes; each has its own limit)."""
        return any(e is ex and kind != "stats" for kind, e in self.pending.values())

    def stop(self, ex: Executor, grace: float = 3.0) -> None:
        """Ask the executor to exit; ``check`` kills it if it has not after ``grace`` seconds."""
        if ex.phase == "stopping":
            return
        ex.phase = "stopping"
        ex.deadline = time.time() + grace
        if ex.socket is not None:
            self._send(ex, "shutdown", {})

    def kill(self, ex: Executor) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.alive(ex):
                try:
                    os.kill(ex.pid, signal.SIGKILL)
                except PermissionError:  # it became a user; this broker lacks CAP_KILL
                    log.error("cannot kill executor %s (pid %d): permission denied", ex.id, ex.pid)

    # -- replies -------------------------------------------------------------------------
    def receive(self, sock: zmq.Socket) -> tuple[str, Executor, Message | MigKernelError] | None:
        """One reply from an executor: (request type, executor, reply or error)."""
        ex = self.by_socket.get(sock)
        frames = sock.recv_multipart()
        if ex is None:
            return None
        reason = refusal_reason(frames)
        if reason is not None:  # keys out of step: this executor is of no use any more
            return "refused", ex, AuthenticationError(f"executor refused the broker: {reason}")
        try:
            msg = decode(frames, lambda _h: ex.control_key, None)
        except MigKernelError as exc:
            log.error("bad reply from executor %s: %s", ex.id, exc)
            return None
        pending = self.pending.pop(msg.re or b"", None)
        if pending is not None and pending[0] == "stats":
            ex.stats_outstanding = False
        # It answers: what it still owes is counted from now.
        ex.awaiting_since = time.time() if ex.stats_outstanding else None
        if pending is None:
            return None
        kind, _ = pending
        if msg.type == "error":
            return kind, ex, MigKernelError(msg.body.get("message", "executor error"))
        return kind, ex, msg

    # -- liveness ------------------------------------------------------------------------
    def alive(self, ex: Executor) -> bool:
        if ex.popen is not None:
            return ex.popen.poll() is None
        ticks = proc_start_ticks(ex.pid)
        return ticks is not None and ticks == ex.start_ticks

    def exit_description(self, ex: Executor) -> str:
        if ex.popen is not None and ex.popen.returncode is not None:
            code = ex.popen.returncode
            return f"exited with signal {-code}" if code < 0 else f"exited with status {code}"
        return "process is gone"

    def forget(self, ex: Executor) -> None:
        """Close the socket of a dead or stopped executor and drop what it still owed us."""
        if ex.socket is not None:
            self.by_socket.pop(ex.socket, None)
            ex.socket.close(linger=0)
            ex.socket = None
        self.pending = {mid: p for mid, p in self.pending.items() if p[1] is not ex}
        if ex.popen is not None:  # dead, or just killed (every caller kills first): reap it
            with contextlib.suppress(subprocess.TimeoutExpired):
                ex.popen.wait(timeout=0.5)
        if ex.endpoint.startswith("ipc://") and not self.alive(ex):
            # Its socket file: an executor that became its holder cannot remove it from the
            # broker's directory itself.
            unlink_quietly(ex.endpoint[len("ipc://") :])

    def log_tail(self, slice_id: str, lines: int = 5) -> str:
        path = self.log_dir / f"{slice_id}.log"
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])
