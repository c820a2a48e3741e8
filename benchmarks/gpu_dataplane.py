"""Data-plane benchmarks on an NVIDIA GPU, side by side with native in-process CuPy.

Run on the GPU machine (scripts/gpu-verify does): ``python benchmarks/gpu_dataplane.py --out
FILE``. Targets (data-plane issue): first call on a warm executor <= 20 ms against a native cold
start (~2.4 s); remoted small-kernel overhead <= 100 us over the same CuPy code in-process; H2D
from the arena >= 80% of pinned cudaMemcpy bandwidth; 20 invocations moving 256 MiB each and
computing about as long as they copy >= 1.6x faster through submit() than one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from broker_bench import machine, percentile

import mig_kernel
from mig_kernel.testing import BrokerProcess, all_free

COLD = """
import time
t0 = time.perf_counter()
import cupy
t1 = time.perf_counter()
a = cupy.arange(1024, dtype=cupy.float32)
t2 = time.perf_counter()
v = float((a * 2).sum())
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def native_cold_start() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CUPY_CACHE_DIR=cache)  # empty kernel cache, as a new user has
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", COLD], capture_output=True, text=True, env=env, check=True
        )
        total = time.perf_counter() - start
    imp, ctx, kernel = (float(x) for x in out.stdout.split())
    return {
        "process_total_s": total,
        "import_s": imp,
        "context_alloc_s": ctx,
        "first_kernel_s": kernel,
    }


def warm_first_call(broker: BrokerProcess) -> dict[str, float]:
    t0 = time.perf_counter()
    session = mig_kernel.connect(broker=broker.connection_file)
    t1 = time.perf_counter()
    value = session.run(lambda: float((xp.arange(1024, dtype=xp.float32) * 2).sum()))  # noqa: F821
    t2 = time.perf_counter()
    session.release()
    assert value == 1047552.0
    return {
        "grant_ms": (t1 - t0) * 1e3,
        "first_call_ms": (t2 - t1) * 1e3,
        "grant_plus_first_call_ms": (t2 - t0) * 1e3,
    }


def native_small_kernel_times(reps: int, warmup: int = 50) -> list[float]:
    """Seconds per in-process CuPy ``a * 2`` on 1,024 floats on a non-blocking stream,
    synchronized: the floor a remoted call is compared with."""
    import cupy

    x = cupy.ones(1024, dtype=cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    native = []
    for i in range(reps + warmup):
        t = time.perf_counter()
        with stream:
            y = x * 2
        stream.synchronize()
        if i >= warmup:
            native.append(time.perf_counter() - t)
    del y
    return native


def remoted_small_kernel_times(session: Any, reps: int, warmup: int = 50) -> list[float]:
    """Client-observed seconds per ``session.run(lambda a: a * 2, x)`` on a device array of
    1,024 floats (the result stays on the slice): the small-kernel call a tenant sees."""
    rx = session.put(np.ones(1024, dtype=np.float32))
    remote = []
    for i in range(reps + warmup):
        t = time.perf_counter()
        r = session.run(lambda a: a * 2, rx)
        if i >= warmup:
            remote.append(time.perf_counter() - t)
        del r
    return remote


def small_kernel_overhead(session: Any, reps: int) -> dict[str, float]:
    native = native_small_kernel_times(reps)
    remote = remoted_small_kernel_times(session, reps)
    n50, r50 = percentile(native, 50) * 1e6, percentile(remote, 50) * 1e6
    return {
        "native_p50_us": n50,
        "native_p99_us": percentile(native, 99) * 1e6,
        "remoted_p50_us": r50,
        "remoted_p99_us": percentile(remote, 99) * 1e6,
        "overhead_p50_us": r50 - n50,
    }


def native_h2d_ms(host: np.ndarray, reps: int = 5) -> dict[str, list[float]]:
    """CUDA-event milliseconds of copying ``host`` (uint8) to the device, from a pinned copy
    and from ``host`` itself (pageable), interleaved, ``reps`` times each."""
    import cupy
    import cupyx

    nbytes = host.nbytes
    pinned = cupyx.empty_pinned(nbytes, dtype=np.uint8)
    pinned[:] = host
    device = cupy.empty(nbytes, dtype=np.uint8)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    pinned_ms, pageable_ms = [], []
    for _ in range(reps):
        start.record()
        device.set(pinned)
        end.record()
        end.synchronize()
        pinned_ms.append(cupy.cuda.get_elapsed_time(start, end))
        start.record()
        device.set(host)
        end.record()
        end.synchronize()
        pageable_ms.append(cupy.cuda.get_elapsed_time(start, end))
    del device
    return {"pinned": pinned_ms, "pageable": pageable_ms}


def arena_h2d_ms(session: Any, host: np.ndarray, reps: int = 5) -> list[float]:
    """The executor's stage-in time (CUDA events on a GPU, wall time on sim) of ``host`` passed
    as an invocation argument through the arena, ``reps`` times."""
    arena_ms = []
    for _ in range(reps):
        invocation = session.submit(lambda a: a.nbytes, host)
        assert invocation.result() == host.nbytes
        arena_ms.append(invocation.timings["stage_in_ms"])
    return arena_ms


def h2d_bandwidth(session: Any, nbytes: int) -> dict[str, float]:
    host = np.random.default_rng(0).integers(0, 255, size=nbytes, dtype=np.uint8)
    native = native_h2d_ms(host)
    pinned_ms, pageable_ms = native["pinned"], native["pageable"]
    arena_ms = arena_h2d_ms(session, host)
    gbps = lambda ms: nbytes / (ms / 1e3) / 1e9  # noqa: E731
    best_pinned, best_arena = min(pinned_ms), min(arena_ms)
    return {
        "bytes": nbytes,
        "pinned_memcpy_GBps": gbps(best_pinned),
        "pageable_memcpy_GBps": gbps(min(pageable_ms)),
        "arena_h2d_GBps": gbps(best_arena),
        "arena_over_pinned": best_pinned / best_arena,
        "arena_h2d_ms_all": arena_ms,
        "pinned_ms_all": pinned_ms,
    }


def pipelining(session: Any, count: int, nbytes: int) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    arrays = [rng.random(nbytes // 4, dtype=np.float32) for _ in range(count)]

    def work(a, k):
        for _ in range(k):
            a = xp.sqrt(a * a + 1.0)  # noqa: F821
        return float(a[0])

    # Warm up: compile the kernels, and grow the arena to hold all 20 arguments at once (a
    # steady pipeline reuses its regions; growing costs page faults and pinning once).
    session.run(work, arrays[0], 2)
    for future in [session.submit(work, a, 0) for a in arrays]:
        future.result()
    # Calibrate: the compute should take about as long as one call's data movement.
    t = time.perf_counter()
    session.run(work, arrays[0], 0)
    copy_s = time.perf_counter() - t
    probe = session.submit(work, arrays[0], 20)
    probe.result()
    per_iter_ms = probe.timings["compute_ms"] / 20
    k = max(1, round(copy_s * 1e3 / per_iter_ms))
    t = time.perf_counter()
    sequential = [session.run(work, a, k) for a in arrays]
    sequential_s = time.perf_counter() - t
    t = time.perf_counter()
    futures = [session.submit(work, a, k) for a in arrays]
    pipelined = [f.result() for f in futures]
    pipelined_s = time.perf_counter() - t
    assert pipelined == sequential
    return {
        "count": count,
        "bytes_each": nbytes,
        "copy_only_call_s": copy_s,
        "compute_iterations": k,
        "compute_ms_each": per_iter_ms * k,
        "sequential_s": sequential_s,
        "pipelined_s": pipelined_s,
        "speedup": sequential_s / pipelined_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/gpu-dataplane.json")
    parser.add_argument("--reps", type=int, default=500)
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine()}
    results["native_cold_start"] = native_cold_start()
    print("native cold start", results["native_cold_start"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        broker = BrokerProcess(Path(tmp) / "state", ["--backend", "nvml"])
        broker.start()
        try:
            broker.wait_for(all_free, timeout=180)
            results["warm_first_call"] = warm_first_call(broker)
            print("warm first call", results["warm_first_call"], flush=True)
            broker.wait_for(all_free, timeout=180)
            session = mig_kernel.connect(broker=broker.connection_file)
            results["small_kernel"] = small_kernel_overhead(session, args.reps)
            print("small kernel", results["small_kernel"], flush=True)
            results["h2d_1GiB"] = h2d_bandwidth(session, 2**30)
            print(
                "h2d", {k: v for k, v in results["h2d_1GiB"].items() if "all" not in k}, flush=True
            )
            results["pipelining"] = pipelining(session, 20, 256 * 2**20)
            print("pipelining", results["pipelining"], flush=True)
            session.release()
        finally:
            broker.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
