"""The CPU floor comparison (issue 15): an empty invocation against the IPC it is built on.

Usage::

    python benchmarks/floor.py [--reps 4000] [--rounds 8] [--no-ray] [--out FILE.json]

One run measures, p50 and p99 of the client's wall clock (``time.perf_counter``):

- ``pyzmq``: a bare DEALER/ROUTER round trip over ipc to an echo server in another process
  (one frame of 64 bytes each way, no Python work on either side beyond the sends);
- ``pipe``: a round trip of 64 bytes over two ``os.pipe``s to an echo process;
- ``python_rpc``: the least a Python client and a Python server can do per call over a Unix
  stream socket pair, spinning as the lane's two ends do (the client for 100 us, the server
  for 1 ms after each call): pickle ``(name, args)``, send; unpickle, look the function up,
  call it, pickle the result, send; unpickle. No call id, future, cancel, timeout, output
  stream, function cache check, validation or accounting: the floor under mig-kernel's lane
  for a call between two Python processes, which the lane's semantics add to;
- ``mig_kernel``: ``session.run(noop)`` on a sim slice (the default ipc executor, with the local
  lane when the executor offers one);
- ``mig_kernel_handles``: ``session.run(two, a, b)`` on the same session, ``a`` and ``b``
  small arrays already on the slice (the matmul's kind of call: two handles in, None out);
- ``mig_kernel_zmq``: the same executor with the lane turned off (``MIG_KERNEL_LANE=0`` in the
  client): the signed ZeroMQ path;
- ``ray``: ``ray.get(actor.noop.remote())`` when ``ray`` is installed.

The first six are interleaved in ``rounds`` rounds of ``reps / rounds`` calls each, so each
sees the same machine (this CPU machine is shared); Ray runs after them, alone, since its
daemons would load the two cores. The load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).parent))
from broker_bench import percentile

import mig_kernel
from mig_kernel.testing import BrokerProcess, all_free

PAYLOAD = b"x" * 64

ECHO_ZMQ = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    route, msg = s.recv_multipart()
    if msg == b"stop":
        break
    s.send_multipart([route, msg])
"""

ECHO_PIPE = """
import os, sys
rfd, wfd = int(sys.argv[1]), int(sys.argv[2])
while True:
    data = os.read(rfd, 4096)
    if not data or data == b"stop":
        break
    os.write(wfd, data)
"""


def noop() -> None:
    return None


def two(a: Any, b: Any) -> None:
    return None


def stats_us(samples: list[float]) -> dict[str, float]:
    return {
        "p50_us": percentile(samples, 50) * 1e6,
        "p99_us": percentile(samples, 99) * 1e6,
        "n": len(samples),
    }


def load() -> list[float]:
    return list(os.getloadavg())


@contextlib.contextmanager
def zmq_echo(tmp: Path) -> Iterator[Callable[[], None]]:
    endpoint = f"ipc://{tmp}/echo.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO_ZMQ, endpoint], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)

    def call() -> None:
        sock.send(PAYLOAD)
        sock.recv()

    try:
        yield call
    finally:
        sock.send(b"stop")
        proc.wait(10)
        sock.close()
        ctx.term()


@contextlib.contextmanager
def pipe_echo() -> Iterator[Callable[[], None]]:
    to_child, from_parent = os.pipe()
    from_child, to_parent = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO_PIPE, str(to_child), str(to_parent)],
        pass_fds=(to_child, to_parent),
    )
    os.close(to_child)
    os.close(to_parent)

    def call() -> None:
        os.write(from_parent, PAYLOAD)
        os.read(from_child, 4096)

    try:
        yield call
    finally:
        os.write(from_parent, b"stop")
        proc.wait(10)
        os.close(from_parent)
        os.close(from_child)


RPC_SERVER = """
import pickle, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
def noop():
    return None
functions = {"noop": noop}
dontwait, clock, spin_until = socket.MSG_DONTWAIT, time.monotonic, 0.0
while True:
    try:
        data = sock.recv(65536, dontwait)
    except BlockingIOError:
        if clock() < spin_until:
            continue
        data = sock.recv(65536)
    if not data:
        break
    name, args = pickle.loads(data)
    sock.send(pickle.dumps(functions[name](*args), 5))
    spin_until = clock() + 0.001
"""


@contextlib.contextmanager
def python_rpc() -> Iterator[Callable[[], None]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [sys.executable, "-c", RPC_SERVER, str(theirs.fileno())], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    recv, send, dontwait, clock = ours.recv, ours.send, socket.MSG_DONTWAIT, time.perf_counter
    request = ("noop", ())

    def call() -> None:
        send(pickle.dumps(request, 5))
        until = clock() + 100e-6
        while True:
            try:
                data = recv(65536, dontwait)
                break
            except BlockingIOError:
                if clock() > until:
                    data = recv(65536)
                    break
        pickle.loads(data)

    try:
        yield call
    finally:
        ours.close()
        proc.wait(10)


@contextlib.contextmanager
def mig_kernel_sessions(tmp: Path) -> Iterator[tuple[Any, Any]]:
    """Two sessions on one sim broker: one with the lane, one without (same executor code)."""
    broker = BrokerProcess(
        tmp / "state",
        ["--backend", "sim", "--sim-layout", "H100-80GB:2x3g.40gb", "--per-user-limit", "2"],
    )
    broker.start()
    try:
        broker.wait_for(all_free, timeout=120)
        lane = mig_kernel.connect(broker=broker.connection_file)
        plain = mig_kernel.connect(broker=broker.connection_file)
        os.environ["MIG_KERNEL_LANE"] = "0"  # read when the executor connection is made
        try:
            plain.run(noop)
        finally:
            del os.environ["MIG_KERNEL_LANE"]
        try:
            yield lane, plain
        finally:
            lane.release()
            plain.release()
    finally:
        broker.stop()


def lane_used(session: Any) -> bool:
    conn = session._conn  # the session's executor connection (remote.py)
    return bool(conn is not None and conn.lane_active())


def interleaved(calls: dict[str, Callable[[], None]], reps: int, rounds: int) -> dict[str, Any]:
    for call in calls.values():  # warm-up
        for _ in range(200):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_round = max(1, reps // rounds)
    clock = time.perf_counter
    for _ in range(rounds):
        for name, call in calls.items():
            samples = times[name]
            for _ in range(per_round):
                t = clock()
                call()
                samples.append(clock() - t)
    return {name: stats_us(samples) for name, samples in times.items()}


def ray_noop(reps: int) -> dict[str, Any]:
    try:
        import ray
    except ImportError as exc:
        return {"error": f"ray is not installed here: {exc}"}

    @ray.remote
    class Actor:
        def noop(self) -> None:
            return None

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = Actor.remote()  # type: ignore[attr-defined]
        for _ in range(200):
            ray.get(actor.noop.remote())
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            ray.get(actor.noop.remote())
            samples.append(time.perf_counter() - t)
        return {**stats_us(samples), "version": ray.__version__}
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
        },
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_before": load(),
        "clock": "client wall (perf_counter) per round trip, us",
    }
    with tempfile.TemporaryDirectory(prefix="mig-floor-") as tmp_name:
        tmp = Path(tmp_name)
        with (
            zmq_echo(tmp) as zmq_call,
            pipe_echo() as pipe_call,
            python_rpc() as rpc_call,
            mig_kernel_sessions(tmp) as (lane, plain),
        ):
            on_slice = (lane.put(np.zeros(16, np.float32)), lane.put(np.ones(16, np.float32)))
            calls = {
                "pyzmq": zmq_call,
                "pipe": pipe_call,
                "python_rpc": rpc_call,
                "mig_kernel": lambda: lane.run(noop),
                "mig_kernel_handles": lambda: lane.run(two, *on_slice),
                "mig_kernel_zmq": lambda: plain.run(noop),
            }
            result["interleaved"] = interleaved(calls, args.reps, args.rounds)
            result["lane_used"] = {
                "mig_kernel": lane_used(lane),
                "mig_kernel_zmq": lane_used(plain),
            }
    result["load_after_interleaved"] = load()
    result["ray"] = {"skipped": "--no-ray"} if args.no_ray else ray_noop(args.reps // 2)
    result["load_after"] = load()
    rows = result["interleaved"]
    zmq_p50 = rows["pyzmq"]["p50_us"]
    mk = rows["mig_kernel"]["p50_us"]
    result["ratios"] = {
        "mig_kernel_over_pyzmq": mk / zmq_p50,
        "mig_kernel_zmq_over_pyzmq": rows["mig_kernel_zmq"]["p50_us"] / zmq_p50,
        "mig_kernel_over_python_rpc": mk / rows["python_rpc"]["p50_us"],
    }
    if "p50_us" in result["ray"]:
        result["ratios"]["ray_over_mig_kernel"] = result["ray"]["p50_us"] / mk
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
