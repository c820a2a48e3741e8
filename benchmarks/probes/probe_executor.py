# On the GPU machine, repository root, deps as scripts/gpu-report installs: python3 <this file>
"""Inside a real executor on the GPU: how much of compute_ms is the kernel itself (timed inside
the function) and how much is the executor's wrapper around it."""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, "benchmarks")
import mig_kernel
from mig_kernel.testing import BrokerProcess, all_free

tmp = Path(tempfile.mkdtemp())
b = BrokerProcess(tmp / "s", ["--backend", "nvml"])
b.start()
b.wait_for(all_free, timeout=180)
s = mig_kernel.connect(broker=b.connection_file)
rx = s.put(np.ones(1024, dtype=np.float32))


def inner(a):
    import time as _t

    t0 = _t.perf_counter()
    _ = a * 2
    t1 = _t.perf_counter()
    xp.cuda.get_current_stream().synchronize()  # noqa: F821
    t2 = _t.perf_counter()
    return (t1 - t0, t2 - t1)


def empty_fn(a):
    return None


rows = {"launch": [], "sync": [], "compute_ms_inner": [], "compute_ms_empty": []}
for i in range(1200):
    f = s.submit(inner, rx)
    (launch_s, sync_s) = f.result()
    g = s.submit(empty_fn, rx)
    g.result()
    if i >= 200:
        rows["launch"].append(launch_s * 1e6)
        rows["sync"].append(sync_s * 1e6)
        rows["compute_ms_inner"].append(f.timings["compute_ms"] * 1e3)
        rows["compute_ms_empty"].append(g.timings["compute_ms"] * 1e3)
med = {k: round(sorted(v)[len(v) // 2], 1) for k, v in rows.items()}
print(json.dumps({"p50_us": med}, indent=1))
s.release()
b.stop()
