"""Why a remoted call's overhead grows with its GPU time (issue 15): stamps of every step.

Usage (on the GPU machine; ``--backend sim`` only checks the code paths)::

    python benchmarks/probes/growth.py [--backend nvml|sim] [--reps 200] [--out FILE.json]
        [--lengths 0,1000,2100,5000,20000] [--variants takeover_2ms,takeover_off]

For spin kernels of 0 us to 20 ms it measures, in alternating blocks of calls made back to
back (the executor is never idle for a native block's length between two remoted calls),
p50 in us:

- ``native``: launch and ``synchronize`` in this process on the current (legacy) stream;
- ``native_nb``: the same on a non-blocking stream, as the executor runs calls;
- ``floor_pipe``, ``floor_pipe_spin``: the same kernel in a forked process behind a Unix
  socketpair, blocking or spinning (``floor_remote``): what remoting costs at the least;
- ``remoted``: ``session.run`` on a one-slice broker, with the client's and the executor's
  stamps (``MIG_KERNEL_TRACE=1``): client submit and send; executor read, staged, run start,
  launched (the function returned), synchronized, ran (result pickled); client done.

once with the executor's watcher taking the socket after 2 ms (the default) and once with
the takeover off (``MIG_KERNEL_TAKEOVER_US``: a diagnosis only; calls then go unwatched);
``--variants`` may add ``rehearse_off`` (the default takeover, no rehearsals on either side:
``MIG_KERNEL_REHEARSE_US=0``, so the executor synchronizes instead of polling).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cloudpickle

sys.path.insert(0, str(Path(__file__).parents[1]))
from broker_bench import percentile
from gpu_suite import running_broker
from overhead_sweep import SPIN_SOURCE, noop, remote_sim_spin, remote_spin

import mig_kernel

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LENGTHS_US = (0, 1000, 2100, 5000, 20000)
# name: (MIG_KERNEL_TAKEOVER_US, MIG_KERNEL_REHEARSE_US), both read where each process starts
VARIANTS = {
    "takeover_2ms": ("2000", "200"),
    "takeover_off": ("1000000000", "200"),
    "rehearse_off": ("2000", "0"),
}
ROUNDS = 5  # native and remoted alternate in this many blocks per length
# Between two blocks: longer than any spin window (the floor server's and the executor's,
# 1 ms), so one system's spinning does not take the cores of the next one's block (on the
# 2-core machine a short block ran entirely beside the last block's spinner).
BLOCK_GAP = 0.005
STEPS = (
    "client_submit",
    "send_to_read",
    "read_to_staged",
    "staged_to_run",
    "run_to_launched",
    "launched_to_synced",
    "synced_to_ran",
    "ran_to_client_done",
)


def natives(gpu: bool) -> dict[str, Any]:
    if not gpu:
        return {"native": remote_sim_spin}
    import cupy

    kernel = cupy.RawKernel(SPIN_SOURCE, "spin")
    legacy = cupy.cuda.get_current_stream()
    nonblocking = cupy.cuda.Stream(non_blocking=True)

    def on(stream: Any) -> Any:
        def call(ns: int) -> None:
            with stream:
                kernel((1,), (1,), (ns,))
            stream.synchronize()

        return call

    return {"native": on(legacy), "native_nb": on(nonblocking)}


FLOOR_SERVER = r"""
import os, socket, sys, time
fd, gpu, spin = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
sock = socket.socket(fileno=fd)
if gpu:
    import cupy
    kernel = cupy.RawKernel(sys.argv[4], "spin")
    stream = cupy.cuda.Stream(non_blocking=True)
    def call(ns):
        with stream:
            kernel((1,), (1,), (ns,))
        stream.synchronize()
else:
    def call(ns):
        end = time.perf_counter_ns() + ns
        while time.perf_counter_ns() < end:
            pass
sock.send(b"r")
until = 0.0
while True:
    data = b""
    while spin and time.monotonic() < until:
        try:
            data = sock.recv(8, socket.MSG_DONTWAIT)
            break
        except BlockingIOError:
            continue
    if not data:
        data = sock.recv(8)
    if not data:
        break
    call(int.from_bytes(data, "little"))
    sock.send(b"\x01")
    until = time.monotonic() + 0.001
"""


def floor_remote(gpu: bool, spin: bool) -> tuple[Any, Any]:
    """The least any remoting can be in Python: another process that runs the same kernel on
    its own non-blocking stream, driven over a Unix socketpair (8 bytes in, 1 byte out);
    ``spin``: both ends poll without sleeping (the server for 1 ms after each answer), as
    mig-kernel's spin windows do. A new interpreter, not a fork: CUDA does not survive one."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    args = [str(theirs.fileno()), "1" if gpu else "0", "1" if spin else "0", SPIN_SOURCE]
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOR_SERVER, *args], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    if mine.recv(1) != b"r":
        raise RuntimeError("the floor server did not start")
    if spin:
        mine.setblocking(False)

    def call(ns: int) -> None:
        mine.send(ns.to_bytes(8, "little"))
        while True:
            try:
                if mine.recv(1):
                    return
            except BlockingIOError:
                continue

    return call, (mine, proc)


def stamped(session: Any, fn: Any, ns: int) -> tuple[float, list[float] | None]:
    t0 = time.perf_counter_ns()
    invocation = session.submit(fn, ns)
    sent = time.perf_counter_ns()
    invocation.result()
    done = time.perf_counter_ns()
    trace = invocation.timings.get("trace")
    if not trace or len(trace) != 6:
        return (done - t0) / 1e3, None
    marks = [t0, sent, *trace, done]
    return (done - t0) / 1e3, [(b - a) / 1e3 for a, b in itertools.pairwise(marks)]


def measure(session: Any, gpu: bool, reps: int, lengths: list[int]) -> dict[str, Any]:
    fn = remote_spin if gpu else remote_sim_spin
    local = natives(gpu)
    ends = []
    for name, spin in (("floor_pipe", False), ("floor_pipe_spin", True)):
        local[name], end = floor_remote(gpu, spin)
        ends.append(end)
    out: dict[str, Any] = {}
    for length in lengths:
        ns = length * 1000
        n = reps if length <= 5000 else max(20, reps // 4)
        times: dict[str, list[float]] = {name: [] for name in (*local, "remoted")}
        steps: list[list[float]] = []
        for call in local.values():
            call(ns)
        session.run(fn, ns)
        for _ in range(ROUNDS):  # blocks of calls back to back: no idle gap between them
            for name, call in local.items():
                time.sleep(BLOCK_GAP)
                for _ in range(n // ROUNDS):
                    t = time.perf_counter_ns()
                    call(ns)
                    times[name].append((time.perf_counter_ns() - t) / 1e3)
            time.sleep(BLOCK_GAP)
            for _ in range(n // ROUNDS):
                total, spans = stamped(session, fn, ns)
                times["remoted"].append(total)
                if spans is not None:
                    steps.append(spans)
        row: dict[str, Any] = {name: percentile(v, 50) for name, v in times.items()}
        row["steps_p50"] = {
            name: percentile([s[i] for s in steps], 50) if steps else None
            for i, name in enumerate(STEPS)
        }
        out[f"{length}us"] = row
        print(length, json.dumps(row), flush=True)
    for sock, proc in ends:
        sock.close()
        proc.wait(timeout=30)
    empty = []
    for _ in range(1000):
        t = time.perf_counter_ns()
        session.run(noop)
        empty.append((time.perf_counter_ns() - t) / 1e3)
    out["empty_call_p50"] = percentile(empty, 50)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="nvml", choices=("nvml", "sim"))
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS_US)))
    parser.add_argument("--variants", default="takeover_2ms,takeover_off")
    args = parser.parse_args()
    gpu = args.backend == "nvml"
    lengths = [int(v) for v in args.lengths.split(",")]
    os.environ["MIG_KERNEL_TRACE"] = "1"
    result: dict[str, Any] = {"cpus": os.cpu_count(), "load": list(os.getloadavg())}
    for label in args.variants.split(","):
        takeover, rehearse = VARIANTS[label]
        os.environ["MIG_KERNEL_TAKEOVER_US"] = takeover
        os.environ["MIG_KERNEL_REHEARSE_US"] = rehearse
        with (
            tempfile.TemporaryDirectory(prefix="mig-growth-") as tmp,
            running_broker(Path(tmp), "growth", args.backend, 1, 1) as broker,
            mig_kernel.connect(broker=broker.connection_file, timeout=120) as session,
        ):
            for _ in range(200):
                session.run(noop)
            print(label, flush=True)
            result[label] = measure(session, gpu, args.reps, lengths)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
