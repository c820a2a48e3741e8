"""Issue 15 on the GPU: invocation overhead against the call's GPU length, in one run.

Usage (on the GPU machine; ``--backend sim`` runs the remoted half on a CPU machine, whose
numbers mean nothing but check the code paths)::

    python benchmarks/overhead_sweep.py [--backend nvml|sim] [--rounds 6] [--per-round 50]
                                        [--out FILE.json]

Measured, p50 and p99 of the client's wall clock (``time.perf_counter``):

- **sweep**: a spin kernel (one thread reading ``%globaltimer`` until the given time passed)
  of 0, 100 us, 1, 2.1, 5 and 20 ms, launched and synchronized in this process with CuPy
  (``native``) and by ``session.run`` on a one-slice broker (``remoted``: the function
  launches the same kernel, the executor synchronizes its stream), interleaved in rounds;
  the remoted call by the lane (the default) and, for comparison, by the signed ZeroMQ path
  (``zmq``) and by the lane without the client's spin (``lane_nospin``);
- **matmul**: 4096 x 4096 float32 ``a @ b`` synchronized, native vs remoted (operands kept
  on the slice, nothing returned), ratio of p50s;
- **empty call**: ``session.run(noop)``;
- **regression checks**: a 64 MiB float64 argument sent and returned to the host
  (``run(identity, x, to_host=True)``) against native pageable CuPy (``cupy.asarray(x).get()``);
  H2D of 1 GiB from the arena against pinned ``cudaMemcpy`` (gpu_dataplane's, CUDA events).

Targets (issue 15): remoted <= native + 40 us + 1% of native at every length; empty call
<= 40 us; matmul <= 1.02x; 64 MiB below native pageable; arena H2D >= 95% of pinned.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from broker_bench import percentile
from floor import stats_us
from gpu_dataplane import h2d_bandwidth
from gpu_suite import cupy_info, nvidia_smi, running_broker

import mig_kernel
from mig_kernel import remote

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LENGTHS_US = (0, 100, 1000, 2100, 5000, 20000)
SPIN_SOURCE = r"""
extern "C" __global__ void spin(long long ns) {
    long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    if (ns <= 0) return;
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""
_KERNELS: dict[str, Any] = {}  # per process: the compiled spin kernel


def spin_kernel(xp: Any) -> Any:
    kernel = _KERNELS.get("spin")
    if kernel is None:
        kernel = _KERNELS["spin"] = xp.RawKernel(SPIN_SOURCE, "spin")
    return kernel


def remote_spin(ns: int) -> None:
    """Runs on the slice (``xp`` is the slice's CuPy); the executor synchronizes after it.
    It refers to no mutable global and no module (a kernel cache would be one; ``np`` is
    the other: this module is pickled by value, and a by-value function that captures a
    module is pickled anew each call), so the client reuses its pickle; CuPy memoizes the
    compiled module by its source, but a new RawKernel object looks its function up again,
    so the kernel is kept on the slice's ``xp`` module, as the native side keeps its own. A
    Python int is passed as a 64-bit integer."""
    kernel = getattr(xp, "_overhead_sweep_spin", None)  # noqa: F821
    if kernel is None:
        kernel = xp._overhead_sweep_spin = xp.RawKernel(SPIN_SOURCE, "spin")  # noqa: F821
    kernel((1,), (1,), (ns,))


def remote_sim_spin(ns: int) -> None:
    """The sim slice's stand-in: the same wait on the CPU. The clock is looked up inside: a
    captured module (``time``) would make the client pickle this function on every call."""
    clock = __import__("time").perf_counter_ns
    end = clock() + ns
    while clock() < end:
        pass


def remote_matmul(a: Any, b: Any) -> None:
    _ = a @ b  # the product is the work; the executor synchronizes


def noop() -> None:
    return None


def identity(x: Any) -> Any:
    return x


def timed(call: Callable[[], Any], n: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        call()
        out.append(clock() - t)


def native_spin(gpu: bool) -> Callable[[int], None]:
    if not gpu:
        return remote_sim_spin
    import cupy

    kernel = spin_kernel(cupy)
    stream = cupy.cuda.get_current_stream()

    def call(ns: int) -> None:
        kernel((1,), (1,), (np.int64(ns),))
        stream.synchronize()

    return call


def use_lane(session: Any, on: bool) -> None:
    """Switch the session's connection between its lane and the signed ZeroMQ path."""
    conn = session._connection()
    if not on:
        conn._close_lane()
        conn.lane_tried = True
    elif conn.lane is None:
        conn.lane_tried = False


def sweep(session: Any, gpu: bool, rounds: int, per_round: int) -> dict[str, Any]:
    native = native_spin(gpu)
    fn = remote_spin if gpu else remote_sim_spin
    spin = remote.SPIN
    variants: dict[str, tuple[bool, float]] = {
        "remoted": (True, spin),
        "lane_nospin": (True, 0.0),
        "zmq": (False, spin),
    }
    out: dict[str, Any] = {}
    for length in LENGTHS_US:
        ns = length * 1000
        times: dict[str, list[float]] = {"native": [], **{v: [] for v in variants}}
        native(ns)
        session.run(fn, ns)
        reps = per_round if length <= 5000 else max(10, per_round // 3)
        for _ in range(rounds):
            timed(lambda ns=ns: native(ns), reps, times["native"])
            for name, (lane, spin_s) in variants.items():
                use_lane(session, lane)
                remote.SPIN = spin_s
                session.run(fn, ns)  # the switch's first call is not measured
                timed(lambda ns=ns: session.run(fn, ns), reps, times[name])
        remote.SPIN = spin
        use_lane(session, True)
        row: dict[str, Any] = {name: stats_us(v) for name, v in times.items()}
        n50 = row["native"]["p50_us"]
        for name in variants:
            r50 = row[name]["p50_us"]
            row[name]["overhead_us"] = r50 - n50
            row[name]["target_us"] = n50 + 40 + 0.01 * n50
            row[name]["met"] = r50 <= n50 + 40 + 0.01 * n50
        out[f"{length}us"] = row
        print(f"{length:>6} us: " + ", ".join(f"{k} {v['p50_us']:.1f}" for k, v in row.items()))
    return out


def matmul(session: Any, gpu: bool, reps: int) -> dict[str, Any]:
    if not gpu:
        return {"skipped": "needs CuPy on a GPU"}
    import cupy

    rng = np.random.default_rng(0)
    ha = rng.random((4096, 4096), dtype=np.float32)
    hb = rng.random((4096, 4096), dtype=np.float32)
    a, b = cupy.asarray(ha), cupy.asarray(hb)
    ra, rb = session.put(ha), session.put(hb)

    def native() -> None:
        _ = a @ b
        cupy.cuda.get_current_stream().synchronize()

    for _ in range(5):
        native()
        session.run(remote_matmul, ra, rb)
    times: dict[str, list[float]] = {"native": [], "remoted": []}
    for _ in range(5):
        timed(native, reps // 5, times["native"])
        timed(lambda: session.run(remote_matmul, ra, rb), reps // 5, times["remoted"])
    row = {k: stats_us(v) for k, v in times.items()}
    row["ratio_p50"] = row["remoted"]["p50_us"] / row["native"]["p50_us"]
    row["met"] = row["ratio_p50"] <= 1.02
    return row


def round_trip_64mib(session: Any, gpu: bool, reps: int) -> dict[str, Any]:
    x = np.random.default_rng(2).random(8 * 2**20)  # 64 MiB of float64
    times: dict[str, list[float]] = {"remoted": [], "native_pageable": []}
    back = session.run(identity, x, to_host=True)
    equal = bool(np.array_equal(back, x))
    del back
    if gpu:
        import cupy

        def native() -> None:
            cupy.asarray(x).get()

        native()
    for _ in range(reps):
        timed(lambda: session.run(identity, x, to_host=True), 1, times["remoted"])
        if gpu:
            timed(native, 1, times["native_pageable"])
    row: dict[str, Any] = {k: stats_us(v) for k, v in times.items() if v}
    row["equal"] = equal
    if gpu:
        row["met"] = row["remoted"]["p50_us"] < row["native_pageable"]["p50_us"]
    return row


def breakdown(session: Any, fn: Any, ns: int, reps: int) -> dict[str, float]:
    """Medians, in us, of where a lane call's time goes: the executor's stamps
    (``MIG_KERNEL_TRACE=1``: read, staged, run, ran; CLOCK_MONOTONIC like this process's
    ``perf_counter_ns``) between the client's own before ``submit`` and after ``result``."""
    steps: dict[str, list[float]] = {
        "client_send_and_wake": [],
        "executor_read_and_stage": [],
        "executor_queue": [],
        "executor_run": [],
        "executor_reply_and_client": [],
    }
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        invocation = session.submit(fn, ns)
        invocation.result()
        t1 = time.perf_counter_ns()
        trace = invocation.timings.get("trace")
        if not trace or len(trace) != 6:
            continue
        read, staged, run, _launched, _synchronized, ran = trace
        spans = ((t0, read), (read, staged), (staged, run), (run, ran), (ran, t1))
        for name, (a, b) in zip(steps, spans, strict=True):
            steps[name].append((b - a) / 1e3)
    return {name: percentile(v, 50) if v else float("nan") for name, v in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="nvml", choices=("nvml", "sim"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gpu = args.backend == "nvml"
    os.environ["MIG_KERNEL_TRACE"] = "1"  # the executors stamp their steps (breakdown)
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load": list(os.getloadavg()),
            "client_spin_us": remote.SPIN * 1e6,
        },
        "clock": "client wall (perf_counter), us",
    }
    if gpu:
        result["machine"]["nvidia_smi"] = nvidia_smi()
        result["machine"]["cupy"] = cupy_info()

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    with (
        tempfile.TemporaryDirectory(prefix="mig-sweep-") as tmp,
        running_broker(Path(tmp), "sweep", args.backend, 1, 1) as broker,
        mig_kernel.connect(broker=broker.connection_file, timeout=120) as session,
    ):
        session.run(noop)
        result["lane_used"] = session._connection().lane_active()
        empty: list[float] = []
        for _ in range(200):
            session.run(noop)
        timed(lambda: session.run(noop), 2000, empty)
        result["empty_call"] = stats_us(empty)
        result["empty_call"]["met"] = result["empty_call"]["p50_us"] <= 40
        print(f"empty call p50 {result['empty_call']['p50_us']:.1f} us", flush=True)
        save()
        result["sweep"] = sweep(session, gpu, args.rounds, args.per_round)
        conn = session._connection()
        result["client_rehearsals"] = {"rehearsals": conn.rehearsals, "echoes": conn.echoes}
        save()
        fn = remote_spin if gpu else remote_sim_spin
        result["breakdown_us"] = {
            f"{length}us": breakdown(session, fn, length * 1000, 300) for length in (0, 1000, 20000)
        }
        print("breakdown", result["breakdown_us"], flush=True)
        save()
        result["matmul_4096"] = matmul(session, gpu, 100)
        print("matmul", result["matmul_4096"], flush=True)
        save()
        result["round_trip_64MiB"] = round_trip_64mib(session, gpu, 15)
        print("64 MiB", result["round_trip_64MiB"], flush=True)
        save()
        if gpu:
            h2d = h2d_bandwidth(session, 2**30)
            result["h2d_1GiB"] = h2d
            print("h2d", h2d, flush=True)
        save()
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
