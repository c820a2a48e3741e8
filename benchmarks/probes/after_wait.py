"""Is Python slower right after a long wait, and does the kind of wait matter? (issue 15)

Usage (on the GPU machine; without CuPy the CUDA rows are left out)::

    python benchmarks/probes/after_wait.py [--reps 200] [--out FILE.json]

The growth probe (growth.py) found every Python step of a remoted call, in the client and in
the executor, taking about 5x longer after a 20 ms call than after an empty one, and the
bare socketpair floor growing too. This probe asks whether that is the machine: in one
process it times a fixed piece of Python work (a small pickle round trip and dict work, as
a call's steps do) and a kernel launch right after waiting ``L`` (0 to 20 ms) in one of these
ways:

- ``busy``: a Python loop reading the clock;
- ``recv_spin``: non-blocking ``recv`` on an idle socketpair in a loop (a syscall per look, as
  the client's and the executor's spin windows do);
- ``sleep``: ``time.sleep`` (the thread leaves the CPU);
- ``cuda_sync``: a spin kernel of length ``L`` and ``stream.synchronize()`` (the default
  schedule), as the executor waits for a call;
- ``cuda_blocking``: the same in a process whose device flags are
  ``cudaDeviceScheduleBlockingSync`` (the thread sleeps in the driver), run as a subprocess;
- ``busy_rehearse_1ms``, ``busy_rehearse_200us``: the busy loop, running the piece of work
  itself every 1 ms (200 us) while it waits: does the work stay warm if it is rehearsed?
- ``cuda_poll_rehearse_1ms``: the spin kernel, waited for by polling the stream (``done``)
  and rehearsing the piece every 1 ms.

p50 of each, us: ``work`` (the first piece after the wait), ``work_again`` (the same piece at
once after it: is the cost paid once, as cold caches would be, or all along, as a slower
clock would be?) and ``launch_sync`` (an empty kernel launched and synchronized after them).

``message``: the system calls alone, a 140-byte message sent and received on a Unix socket
pair right after waiting ``busy``, ``recv_spin`` (on another pair), or ``busy_peek_200us``
(a non-blocking ``recv`` with ``MSG_PEEK`` on the pair every 200 us, which reads nothing:
the executor's rehearsal of its lane's receive, wire/lane.py ``answer_echo``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))
from broker_bench import percentile
from overhead_sweep import SPIN_SOURCE

LENGTHS_US = (0, 1000, 5000, 20000)
MESSAGE = {"call_id": 17, "fn": b"x" * 40, "args": (1, 2.5, "abc"), "timeout": None}


def work() -> None:
    """About a call step's worth of Python: a pickle round trip and some dict work."""
    body = pickle.loads(pickle.dumps(MESSAGE, protocol=pickle.HIGHEST_PROTOCOL))
    table = {}
    for i in range(50):
        table[i] = body.get("call_id", 0) + i
    sorted(table.items())


def waits(cuda: Any) -> dict[str, Any]:
    a, b = socket.socketpair()
    a.setblocking(False)
    clock = time.perf_counter_ns

    def busy(ns: int) -> None:
        end = clock() + ns
        while clock() < end:
            pass  # the wait itself: nothing but the clock

    def recv_spin(ns: int) -> None:
        end = clock() + ns
        while clock() < end:
            try:
                a.recv(8)
            except BlockingIOError:
                continue  # as the spin windows look: try, fail, look again

    def sleep(ns: int) -> None:
        if ns:
            time.sleep(ns / 1e9)

    def rehearsing(every_ns: int) -> Any:
        def wait(ns: int) -> None:
            end = clock() + ns
            due = clock() + every_ns
            while (now := clock()) < end:
                if now >= due:
                    work()
                    due = clock() + every_ns

        return wait

    found: dict[str, Any] = {
        "busy": busy,
        "recv_spin": recv_spin,
        "sleep": sleep,
        "busy_rehearse_1ms": rehearsing(1_000_000),
        "busy_rehearse_200us": rehearsing(200_000),
    }
    if cuda is not None:
        kernel, stream = cuda

        def cuda_sync(ns: int) -> None:
            with stream:
                kernel((1,), (1,), (ns,))
            stream.synchronize()

        def cuda_poll_rehearse(ns: int) -> None:
            with stream:
                kernel((1,), (1,), (ns,))
            due = clock() + 1_000_000
            while not stream.done:
                if clock() >= due:
                    work()
                    due = clock() + 1_000_000
            stream.synchronize()

        found["cuda_sync"] = cuda_sync
        found["cuda_poll_rehearse_1ms"] = cuda_poll_rehearse
    found["_keep"] = (a, b)
    return found


def measure(reps: int, cuda: Any) -> dict[str, Any]:
    kinds = waits(cuda)
    kinds.pop("_keep")
    launch = None
    if cuda is not None:
        kernel, stream = cuda

        def launch() -> None:
            with stream:
                kernel((1,), (1,), (0,))
            stream.synchronize()

    clock = time.perf_counter_ns
    out: dict[str, Any] = {}
    for length in LENGTHS_US:
        ns = length * 1000
        samples: dict[str, dict[str, list[float]]] = {
            k: {"work": [], "work_again": [], "launch_sync": []} for k in kinds
        }
        n = reps if length <= 5000 else max(20, reps // 4)
        for _ in range(n):
            for name, wait in kinds.items():
                wait(ns)
                t0 = clock()
                work()
                t1 = clock()
                work()
                t2 = clock()
                samples[name]["work"].append((t1 - t0) / 1e3)
                samples[name]["work_again"].append((t2 - t1) / 1e3)
                t1 = t2
                if launch is not None:
                    launch()
                    samples[name]["launch_sync"].append((clock() - t1) / 1e3)
        out[f"{length}us"] = {
            name: {k: round(percentile(v, 50), 2) for k, v in s.items() if v}
            for name, s in samples.items()
        }
        print(length, out[f"{length}us"], flush=True)
    return out


def measure_message(reps: int) -> dict[str, Any]:
    """``message`` of the docstring: p50 us of a send and its receive after each wait."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    payload = b"m" * 140
    clock = time.perf_counter_ns

    def busy_peek(ns: int) -> None:
        end = clock() + ns
        due = clock() + 200_000
        while (now := clock()) < end:
            if now >= due:
                with contextlib.suppress(BlockingIOError):
                    b.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                due = clock() + 200_000

    kinds = waits(None)
    found = {"busy": kinds["busy"], "recv_spin": kinds["recv_spin"], "busy_peek_200us": busy_peek}
    out: dict[str, Any] = {}
    for length in LENGTHS_US:
        ns = length * 1000
        samples: dict[str, list[float]] = {k: [] for k in found}
        for _ in range(reps if length <= 5000 else max(20, reps // 4)):
            for name, wait in found.items():
                wait(ns)
                t0 = clock()
                a.send(payload)
                b.recv(4096)
                samples[name].append((clock() - t0) / 1e3)
        out[f"{length}us"] = {k: round(percentile(v, 50), 2) for k, v in samples.items()}
        print("message", length, out[f"{length}us"], flush=True)
    return out


def cuda_setup(blocking: bool) -> Any:
    try:
        import cupy
    except ImportError:
        return None
    if blocking:  # CuPy has no setDeviceFlags: the driver's, on the primary context it uses
        import ctypes

        driver = ctypes.CDLL("libcuda.so.1")
        if driver.cuInit(0) or driver.cuDevicePrimaryCtxSetFlags(0, 4):  # BLOCKING_SYNC
            raise RuntimeError("could not set CU_CTX_SCHED_BLOCKING_SYNC on device 0")
    kernel = cupy.RawKernel(SPIN_SOURCE, "spin")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        kernel((1,), (1,), (0,))
    stream.synchronize()
    return kernel, stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--blocking-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.blocking_child:
        cuda = cuda_setup(blocking=True)
        kinds = measure(args.reps, cuda)
        print(json.dumps(kinds))
        return
    cuda = cuda_setup(blocking=False)
    result: dict[str, Any] = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    result["default"] = measure(args.reps, cuda)
    result["message"] = measure_message(args.reps)
    if cuda is not None:
        child = subprocess.run(
            [sys.executable, __file__, "--blocking-child", "--reps", str(args.reps)],
            capture_output=True,
            text=True,
            check=False,
        )
        last = child.stdout.strip().splitlines()[-1:]
        try:
            result["blocking_sync"] = json.loads(last[0])
        except (IndexError, json.JSONDecodeError):
            result["blocking_sync"] = {"error": child.stderr[-2000:] or f"exit {child.returncode}"}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
