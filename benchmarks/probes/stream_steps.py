"""What the executor's GPU steps around a call cost, each alone, against native (issue 15).

Usage (a GPU machine)::

    python benchmarks/probes/stream_steps.py [--reps 3000] [--out FILE.json]

The overhead sweep's breakdown has the executor's run of an empty spin kernel at 17 to 20 us
on an H100 where native CuPy's whole call (launch on the current stream, synchronize) takes
about 10: the executor launches on its own non-blocking stream, inside ``with stream``, after
``stream.wait_event`` when an earlier copy is pending, then polls ``stream.done`` (rehearsing
between polls, dataplane.py ``_await``) and synchronizes once more for the stream's errors.
This times, in one process, p50 over ``--reps`` calls each, interleaved in rounds:

- **whole calls** of the empty spin kernel: ``native`` (the sweep's native), ``nb_sync``
  (on a non-blocking stream, synchronized), ``exec_like`` (what ``_compute`` and ``_await``
  did before the fifth pass: ``with stream``, launch, poll ``done``, synchronize),
  ``exec_query`` (what they do now: poll ``cudaStreamQuery`` itself, no synchronize after
  work that ended well), ``exec_wait_event`` (``exec_like`` after ``stream.wait_event`` of
  a finished event, which every call did after a copy until the fifth pass);
- **pieces**: ``with stream: pass``, ``stream.done`` and ``stream.synchronize()`` of an idle
  stream, ``stream.wait_event`` of a finished event, ``event.done`` of a finished event, the
  launch alone (``kernel(...)`` on the stream, not waited for; its cost is the call's).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))
from overhead_sweep import SPIN_SOURCE


def p50_us(call: Callable[[], Any], reps: int) -> list[float]:
    clock = time.perf_counter_ns
    out = []
    for _ in range(reps):
        t = clock()
        call()
        out.append((clock() - t) / 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import cupy

    kernel = cupy.RawKernel(SPIN_SOURCE, "spin")
    null = cupy.cuda.get_current_stream()
    stream = cupy.cuda.Stream(non_blocking=True)
    finished = cupy.cuda.Event(disable_timing=True)
    finished.record(stream)
    finished.synchronize()
    grid, block, zero = (1,), (1,), (0,)

    def native() -> None:
        kernel(grid, block, zero)
        null.synchronize()

    def nb_sync() -> None:
        with stream:
            kernel(grid, block, zero)
        stream.synchronize()

    def exec_like() -> None:
        with stream:
            kernel(grid, block, zero)
        while not stream.done:
            pass  # the poll itself is what is timed
        stream.synchronize()

    query = functools.partial(cupy.cuda.runtime.streamQuery, stream.ptr)

    def exec_query() -> None:
        with stream:
            kernel(grid, block, zero)
        while query() == 600:  # cudaErrorNotReady
            pass  # the poll itself is what is timed

    def exec_wait_event() -> None:
        stream.wait_event(finished)
        exec_like()

    def enter_exit() -> None:
        with stream:
            pass  # entering and leaving the stream is what is timed

    def launch_only() -> None:
        with stream:
            kernel(grid, block, zero)

    wholes: dict[str, Callable[[], None]] = {
        "native": native,
        "nb_sync": nb_sync,
        "exec_like": exec_like,
        "exec_query": exec_query,
        "exec_wait_event": exec_wait_event,
    }
    pieces: dict[str, Callable[[], Any]] = {
        "with stream: pass": enter_exit,
        "stream.done (idle)": lambda: stream.done,
        "cudaStreamQuery (idle)": query,
        "stream.synchronize() (idle)": stream.synchronize,
        "stream.wait_event(finished)": lambda: stream.wait_event(finished),
        "finished.done": lambda: finished.done,
    }
    for call in [*wholes.values(), *pieces.values()]:
        for _ in range(300):
            call()
    stream.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in [*wholes, *pieces, "launch alone"]}
    per_round = max(1, args.reps // args.rounds)
    for _ in range(args.rounds):
        for name, call in [*wholes.items(), *pieces.items()]:
            samples[name] += p50_us(call, per_round)
            stream.synchronize()
        for _ in range(per_round):  # each launch's work waited for outside its timing
            t = time.perf_counter_ns()
            launch_only()
            samples["launch alone"].append((time.perf_counter_ns() - t) / 1e3)
            stream.synchronize()
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "load": list(os.getloadavg()),
        "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "reps": per_round * args.rounds,
        "p50_us": {name: round(statistics.median(v), 3) for name, v in samples.items()},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
