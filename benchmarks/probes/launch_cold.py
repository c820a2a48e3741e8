"""Does a native CuPy matmul's launch run slower after a wait (issue 15)?

Usage (a GPU machine)::

    python benchmarks/probes/launch_cold.py OUT.json

The remoted 4096^2 matmul's launch step took 62 us in the executor (matmul_probe.py). This
times the CPU side of native ``a @ b`` (until it returns, not waited for), p50 of 300, us:

- ``after_matmul_wait``: right after synchronizing the previous 2.7 ms matmul (the thread
  waited in the driver, as native and remoted matmul calls do);
- ``warm_small_then``: after two small matmuls back to back (cuBLAS's path warm);
- ``small_launch_warm``: a 16^2 matmul's launch, for scale.
"""

from __future__ import annotations

import json
import sys
import time

import cupy
import numpy as np


def main() -> None:
    a = cupy.random.random((4096, 4096), dtype=np.float32)
    b = cupy.random.random((4096, 4096), dtype=np.float32)
    small = cupy.random.random((16, 16), dtype=np.float32)
    stream = cupy.cuda.get_current_stream()
    clock = time.perf_counter
    for _ in range(20):
        a @ b
        stream.synchronize()
    times: dict[str, list[float]] = {
        "after_matmul_wait": [],
        "warm_small_then": [],
        "small_launch_warm": [],
    }
    for _ in range(300):
        a @ b
        stream.synchronize()  # a 2.7 ms wait in the driver
        t = clock()
        a @ b
        times["after_matmul_wait"].append(clock() - t)
        stream.synchronize()
        t = clock()
        small @ small
        times["small_launch_warm"].append(clock() - t)
        stream.synchronize()
        for _ in range(2):
            small @ small
            stream.synchronize()
        t = clock()
        a @ b
        times["warm_small_then"].append(clock() - t)
        stream.synchronize()
    out = {k: round(sorted(v)[len(v) // 2] * 1e6, 2) for k, v in times.items()}
    print(json.dumps(out))
    with open(sys.argv[1], "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main()
