"""Real broker processes for tests and benchmarks: started with the CLI, stopped or SIGKILLed
for real, and small readers of their state."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .client import BrokerClient
from .wire.errors import MigKernelError


class BrokerProcess:
    def __init__(
        self,
        state_dir: Path,
        args: list[str],
        pythonpath: tuple[str, ...] = (),
        *,
        connection_file: Path | None = None,
        lock_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.args = args
        self.pythonpath = pythonpath  # extra import paths (test identity providers)
        # A multi-user broker writes its public connection file into its runtime dir.
        self.connection_file = connection_file or state_dir / "broker.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / f"{state_dir.name}-broker.log"
        # Its own per-GPU locks unless told otherwise: brokers of tests and benchmarks often
        # serve the same simulated GPU at once (and a developer's `make run` may, too).
        self.lock_dir = lock_dir or state_dir.parent / f"{state_dir.name}-locks"
        self.extra_env = env or {}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, env.get("PYTHONPATH", "")])
        env["JUPYTER_CONFIG_DIR"] = str(self.state_dir.parent / "jupyter-config")
        env["JUPYTER_CONFIG_PATH"] = ""
        env["MIG_KERNEL_LOCK_DIR"] = str(self.lock_dir)
        env.pop("MIG_KERNEL_BROKER", None)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> BrokerProcess:
        with contextlib.suppress(FileNotFoundError):
            self.connection_file.unlink()
        cmd = [
            sys.executable,
            "-m",
            "mig_kernel",
            "broker",
            "--state-dir",
            str(self.state_dir),
            *self.args,
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env())
        deadline = time.monotonic() + timeout
        while not self.connection_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited {self.proc.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"broker did not start: {self.log.read_text()}")
            time.sleep(0.02)
        return self

    def client(self, user: str | None = None) -> BrokerClient:
        if user is None:
            return BrokerClient(self.connection_file)
        return claimed_client(self.connection_file, user)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(MigKernelError):
                last = self.status()
                if predicate(last):
                    return last
            time.sleep(0.05)
        raise AssertionError(
            f"condition not reached within {timeout} s; last status: {json.dumps(last)[:2000]}"
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("broker did not stop within 20 s of SIGTERM") from None


def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` every 0.1 s until it returns something true; returns that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not reached within {timeout} s")


def all_free(status: dict[str, Any]) -> bool:
    return bool(status["slices"]) and all(s["state"] == "free" for s in status["slices"])


def count(status: dict[str, Any], state: str) -> int:
    return sum(1 for s in status["slices"] if s["state"] == state)


def claimed_client(connection_file: Path, user: str) -> BrokerClient:
    """A client whose hello claims ``user`` (only ClaimedUserIdentity brokers believe it)."""
    return BrokerClient(connection_file, claims={"user": user})


def executor_pids(state_dir: Path) -> dict[str, int]:
    """slice id -> executor pid, read from the broker's SQLite state."""
    import sqlite3

    db = sqlite3.connect(str(state_dir / "broker.sqlite"))
    try:
        return dict(db.execute("SELECT slice_id, pid FROM executors").fetchall())
    finally:
        db.close()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``mig-kernel ARGS`` in a child process, as a user types it (no Jupyter config path)."""
    return subprocess.run(
        [sys.executable, "-m", "mig_kernel", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, JUPYTER_CONFIG_PATH="", **(env or {})),
    )


@contextlib.contextmanager
def executor_in_process(
    directory: Path, runtime: str = "numpy"
) -> Iterator[tuple[Any, Any, socket.socket]]:
    """An executor server in this process with one lane on a socket pair, for probes and
    tests of its request path step by step: yields (server, lane, the client's end). Its
    watcher thread is not started; this thread is its main thread."""
    import zmq

    from .executor.lanes import Lane
    from .executor.runtime import warm_start
    from .executor.server import ExecutorServer
    from .wire.executor_spec import ExecutorSpec

    spec = ExecutorSpec(
        executor_id="E-in-process",
        endpoint=f"ipc://{directory}/executor",
        control_key="00" * 32,
        tenant_key="11" * 32,
        slice={"id": "in-process"},
        runtime=runtime,
        memory_limit=None,
    )
    context = zmq.Context()
    server = ExecutorServer(spec, warm_start(runtime, None), context)
    server.dataplane.runner_ident = threading.get_ident()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    lane = Lane(route="lane-in-process", sock=ours, zmq_route=b"in-process")
    server.lanes.by_route[lane.route] = lane
    try:
        yield server, lane, theirs
    finally:  # (not server.close(): its watcher thread was never started)
        server.dataplane.close()
        server.lanes.close()
        server.streams.close(linger=0)
        server.socket.close(linger=0)
        os.close(server.watcher_woken)
        os.close(server.wake_watcher)
        context.term()
        ours.close()
        theirs.close()
