# On the GPU machine, repository root, deps as scripts/gpu-report installs: python3 <this file>
"""Where the executor's 104 us for a 22 us kernel goes: the runtime's compute path, step by
step, in one process, with and without a second thread like the executor's watcher."""

import json
import threading
import time

import numpy as np

from mig_kernel.executor.runtime import warm_start

rt = warm_start("cupy")
cp = rt.xp
a = rt.to_device(np.ones(1024, np.float32))
rt.copy_stream.synchronize()
x = cp.ones(1024, dtype=cp.float32)
stream = cp.cuda.Stream(non_blocking=True)


def timed(f, n=3000):
    s = []
    for i in range(n + 200):
        t0 = time.perf_counter()
        f()
        dt = time.perf_counter() - t0
        if i >= 200:
            s.append(dt)
    s.sort()
    return {
        "p50_us": round(s[len(s) // 2] * 1e6, 1),
        "p99_us": round(s[int(len(s) * 0.99)] * 1e6, 1),
    }


def native():
    with stream:
        _ = x * 2
    stream.synchronize()


def native_on_handle():
    with stream:
        _ = a * 2
    stream.synchronize()


def compute_no_event():
    with rt.compute(None):
        _ = a * 2


def compute_with_event():
    ev = rt.record_copy()
    with rt.compute(ev):
        _ = a * 2


def call_path():  # what one invocation does around the kernel: two events, compute, elapsed
    e0 = rt.record_copy()
    e1 = rt.record_copy()
    with rt.compute(e1):
        _ = a * 2
    rt.elapsed_ms(e0, e1, 0.0)


def event_create_record():
    ev = cp.cuda.Event()
    ev.record(rt.copy_stream)


def elapsed_only():
    e0 = rt.record_copy()
    e1 = rt.record_copy()
    rt.elapsed_ms(e0, e1, 0.0)


cases = [
    native,
    native_on_handle,
    compute_no_event,
    compute_with_event,
    call_path,
    event_create_record,
    elapsed_only,
]
out = {"alone": {f.__name__: timed(f) for f in cases}}
# a watcher-like thread: wakes every 2 ms on a condition (as the executor's does while calls come)
stop = False
cond = threading.Condition()


def watcher():
    while not stop:
        with cond:
            cond.wait(0.002)


th = threading.Thread(target=watcher, daemon=True)
th.start()
out["with_2ms_watcher"] = {f.__name__: timed(f) for f in (native, compute_with_event, call_path)}
stop = True
th.join()
print(json.dumps(out, indent=1))
