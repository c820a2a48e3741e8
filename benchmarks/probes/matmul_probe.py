"""Where a remoted 4096^2 matmul's extra time goes (issue 15).

Usage (on the GPU machine)::

    python benchmarks/probes/matmul_probe.py [--reps 100] [--out FILE.json]

p50 in us, interleaved in 5 blocks:

- ``native``: ``a @ b`` and ``synchronize`` on the current (legacy) stream, as overhead_sweep
  measures it;
- ``native_nb``: the same inside ``with stream`` of a non-blocking stream, as the executor runs
  calls (CuPy points its cuBLAS handle at that stream on each call);
- ``native_nb_prealloc``: ``cupy.matmul(a, b, out=c)`` on that stream (no allocation);
- ``remoted``: ``session.run`` of the same on a one-slice broker with the executor's stamps
  (``MIG_KERNEL_TRACE=1``): client submit and send, executor read-and-stage, queue, the
  function (launch), synchronize, result, reply and client wake-up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from broker_bench import percentile
from gpu_suite import running_broker
from growth import STEPS  # the same stamps, named the same
from overhead_sweep import remote_matmul

import mig_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["MIG_KERNEL_TRACE"] = "1"
    import cupy

    rng = np.random.default_rng(0)
    ha = rng.random((4096, 4096), dtype=np.float32)
    hb = rng.random((4096, 4096), dtype=np.float32)
    a, b = cupy.asarray(ha), cupy.asarray(hb)
    c = cupy.empty_like(a)
    legacy = cupy.cuda.get_current_stream()
    stream = cupy.cuda.Stream(non_blocking=True)

    def native() -> None:
        _ = a @ b
        legacy.synchronize()

    def native_nb() -> None:
        with stream:
            _ = a @ b
        stream.synchronize()

    def native_nb_prealloc() -> None:
        with stream:
            cupy.matmul(a, b, out=c)
        stream.synchronize()

    result: dict[str, Any] = {"cpus": os.cpu_count(), "load": list(os.getloadavg())}
    with (
        tempfile.TemporaryDirectory(prefix="mig-matmul-") as tmp,
        running_broker(Path(tmp), "matmul", "nvml", 1, 1) as broker,
        mig_kernel.connect(broker=broker.connection_file, timeout=120) as session,
    ):
        ra, rb = session.put(ha), session.put(hb)

        def remoted() -> list[float] | None:
            t0 = time.perf_counter_ns()
            invocation = session.submit(remote_matmul, ra, rb)
            sent = time.perf_counter_ns()
            invocation.result()
            done = time.perf_counter_ns()
            trace = invocation.timings.get("trace")
            if not trace or len(trace) != 6:
                return None
            marks = [t0, sent, *trace, done]
            return [(y - x) / 1e3 for x, y in itertools.pairwise(marks)]

        calls = {"native": native, "native_nb": native_nb, "native_nb_prealloc": native_nb_prealloc}
        for _ in range(5):
            for call in calls.values():
                call()
            remoted()
        times: dict[str, list[float]] = {name: [] for name in (*calls, "remoted")}
        steps: list[list[float]] = []
        for _ in range(5):
            for name, call in calls.items():
                for _ in range(args.reps // 5):
                    t = time.perf_counter_ns()
                    call()
                    times[name].append((time.perf_counter_ns() - t) / 1e3)
            for _ in range(args.reps // 5):
                t = time.perf_counter_ns()
                spans = remoted()
                times["remoted"].append((time.perf_counter_ns() - t) / 1e3)
                if spans is not None:
                    steps.append(spans)
        result["p50_us"] = {name: percentile(v, 50) for name, v in times.items()}
        result["remoted_steps_p50"] = {
            name: percentile([s[i] for s in steps], 50) if steps else None
            for i, name in enumerate(STEPS)
        }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
