# On the GPU machine, repository root, deps as scripts/gpu-report installs: python3 <this file>
"""Why a CuPy launch is slower inside the executor: the same ``a * 2`` launch (no synchronize)
in a plain process, then with the memory pool's limit set as the executor sets it, then from a
second thread, then inside a real executor (timed inside the function)."""

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import cupy as cp
import numpy as np


def launches(a, n=3000):
    s = []
    stream = cp.cuda.Stream(non_blocking=True)
    for i in range(n + 200):
        with stream:
            t0 = time.perf_counter()
            _ = a * 2
            dt = time.perf_counter() - t0
        stream.synchronize()
        if i >= 200:
            s.append(dt)
    s.sort()
    return round(s[len(s) // 2] * 1e6, 1)


out = {}
a = cp.ones(1024, dtype=cp.float32)
out["plain"] = launches(a)
free, total = cp.cuda.runtime.memGetInfo()
cp.get_default_memory_pool().set_limit(size=total)
out["pool_limit_set"] = launches(a)
result = {}
t = threading.Thread(target=lambda: result.setdefault("v", launches(a)))
t.start()
t.join()
out["second_thread"] = result["v"]
cp.get_default_memory_pool().set_limit(size=0)
out["pool_limit_unset_again"] = launches(a)

sys.path.insert(0, "benchmarks")
import mig_kernel  # noqa: E402
from mig_kernel.testing import BrokerProcess, all_free  # noqa: E402

tmp = Path(tempfile.mkdtemp())
b = BrokerProcess(tmp / "s", ["--backend", "nvml"])
b.start()
b.wait_for(all_free, timeout=180)
s = mig_kernel.connect(broker=b.connection_file)
rx = s.put(np.ones(1024, dtype=np.float32))


def in_executor(a):
    import time as _t

    stream = xp.cuda.Stream(non_blocking=True)  # noqa: F821
    limit = xp.get_default_memory_pool().get_limit()  # noqa: F821
    times = []
    for _ in range(3200):
        with stream:
            t0 = _t.perf_counter()
            _ = a * 2
            times.append(_t.perf_counter() - t0)
        stream.synchronize()
    times = sorted(times[200:])
    return round(times[len(times) // 2] * 1e6, 1), limit


out["inside_executor_loop"], out["executor_pool_limit"] = s.run(in_executor, rx)
s.release()
b.stop()
print(json.dumps(out, indent=1))
