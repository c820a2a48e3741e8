"""Notebook-integration costs (issue 4), side by side in one run:

- kernel start: a mig-kernel kernel with eager acquire (provisioner lease + attach at start)
  against a plain ipykernel, each from ``start_kernel`` to the kernel_info reply, alternating;
- the first ``%%gpufunc`` cell of a fresh kernel on a warm pool: timed inside the kernel
  (``run_cell``, magic overhead included) once the kernel's background attach has finished
  (how long that was still running when the cell came is recorded too), and at the client
  (execute request to reply) sent right after the kernel is ready, background work included;
- an empty ``%%gpufunc`` cell against an empty ordinary cell, timed inside the kernel.

Usage::

    python benchmarks/notebook_bench.py [--backend sim|nvml] [--starts 10] [--cells 200]
        [--out benchmarks/results/notebook-2core.json]

Starts its own broker (``--backend nvml`` runs two memory-capped ``process`` slices per GPU
when MIG is off) in a temporary state dir, and its own kernelspecs in a temporary dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from mig_kernel.jupyter.kernelspec import kernel_json
from mig_kernel.testing import BrokerProcess, all_free

PLAIN = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "plain ipykernel",
    "language": "python",
}

# Runs inside the kernel: times cells with the kernel's own shell, so the numbers are the
# kernel's work, not the frontend round trip.
# The kernel attaches to its slice on a background thread once it is ready (kernel.py); this
# waits for that to finish, then times the first GPU cell with the kernel's own shell.
IN_KERNEL_FIRST = """
import threading, time as _t
_ip = get_ipython()
_t0 = _t.perf_counter()
for _th in threading.enumerate():
    if _th.name == "mig-kernel attach":
        _th.join()
_attach_ms = (_t.perf_counter() - _t0) * 1e3
_t0 = _t.perf_counter()
_r = _ip.run_cell("%%gpufunc\\ny = xp.ones(16)", store_history=False)
_first_ms = (_t.perf_counter() - _t0) * 1e3
assert _r.success, _r.error_in_exec
print(repr((_attach_ms, _first_ms)))
"""

IN_KERNEL_EMPTY = """
import time as _t, statistics as _st
_ip = get_ipython()
def _times(code, n):
    out = []
    for _ in range(n):
        t0 = _t.perf_counter()
        r = _ip.run_cell(code, store_history=False)
        out.append((_t.perf_counter() - t0) * 1e3)
        assert r.success, r.error_in_exec
    return out
_times("pass", 20); _times("%%gpufunc\\npass", 20)  # warm-up
_plain, _gpu = [], []
for _ in range({rounds}):  # interleaved, so drift hits both alike
    _plain += _times("pass", 10)
    _gpu += _times("%%gpufunc\\npass", 10)
print(repr({{"plain": _plain, "gpufunc": _gpu}}))
"""


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50": statistics.median(ordered),
        "p90": ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)],  # nearest rank
        "min": ordered[0],
        "max": ordered[-1],
    }


def last_stdout(kc: Any, code: str) -> str:
    text: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            text.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            raise RuntimeError("\n".join(msg["content"]["traceback"]))

    kc.execute_interactive(code, timeout=120, output_hook=hook)
    return "".join(text).strip().splitlines()[-1]


def start(ksm: KernelSpecManager, name: str) -> tuple[KernelManager, Any, float]:
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    started = time.perf_counter()
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    return km, kc, time.perf_counter() - started


def stop(km: KernelManager, kc: Any) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sim", "nvml"], default="sim")
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--cells", type=int, default=200, help="empty cells of each kind")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mig-notebook-bench-"))
    broker_args = ["--backend", args.backend, "--per-user-limit", "2"]
    if args.backend == "nvml":
        broker_args += ["--share", "2"]
    broker = BrokerProcess(tmp / "state", broker_args)
    broker.start()
    broker.wait_for(all_free, timeout=180)
    os.environ["MIG_KERNEL_BROKER"] = str(broker.connection_file)
    kernels = tmp / "kernels"
    for name, spec in (("plain", PLAIN), ("mig", kernel_json(None, "mig eager"))):
        (kernels / name).mkdir(parents=True)
        (kernels / name / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)])
    result: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "backend": args.backend,
            "node": platform.node(),
        }
    }
    try:
        # -- kernel start, alternating so both see the same machine state ------------------
        for name in ("plain", "mig"):  # one unrecorded start each: imports into the page cache
            stop(*start(ksm, name)[:2])
        starts: dict[str, list[float]] = {"plain": [], "mig": []}
        first_in: list[float] = []
        attach_tail: list[float] = []
        first_rt: list[float] = []
        for i in range(args.starts):
            for name in ("plain", "mig") if i % 2 == 0 else ("mig", "plain"):
                broker.wait_for(all_free, timeout=120)  # a warm pool for every mig start
                km, kc, seconds = start(ksm, name)
                starts[name].append(seconds * 1e3)
                if name == "mig":
                    if i % 2 == 0:  # the first cell, timed inside the kernel
                        tail, first = eval(last_stdout(kc, IN_KERNEL_FIRST))  # a tuple literal
                        attach_tail.append(tail)
                        first_in.append(first)
                    else:  # the first cell, timed at the client
                        t0 = time.perf_counter()
                        last_stdout(kc, "%%gpufunc\ny = xp.ones(16)\nprint('ok')")
                        first_rt.append((time.perf_counter() - t0) * 1e3)
                stop(km, kc)
        result["kernel_start_ms"] = {k: summary(v) for k, v in starts.items()}
        result["kernel_start_ratio_p50"] = (
            result["kernel_start_ms"]["mig"]["p50"] / result["kernel_start_ms"]["plain"]["p50"]
        )
        result["first_gpufunc_cell_ms"] = {
            "inside_kernel_after_attach": summary(first_in),
            "attach_still_running_after_ready": summary(attach_tail),
            "client_round_trip_right_after_ready": summary(first_rt),
        }
        # -- empty cells ---------------------------------------------------------------------
        broker.wait_for(all_free, timeout=120)
        km, kc, _ = start(ksm, "mig")
        try:
            code = IN_KERNEL_EMPTY.format(rounds=max(1, args.cells // 10))
            cells = eval(last_stdout(kc, code))  # a dict literal the kernel printed
        finally:
            stop(km, kc)
        plain, gpu = summary(cells["plain"]), summary(cells["gpufunc"])
        result["empty_cell_ms"] = {
            "plain": plain,
            "gpufunc": gpu,
            "overhead_p50": gpu["p50"] - plain["p50"],
        }
    finally:
        broker.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
