"""What each step of a warm empty lane call costs, by itself, in each process (issue 15).

Usage (any machine; the executor half runs a NumPy executor in this process, or with
``--runtime cupy`` a CuPy one, on a GPU machine, whose call launches an empty spin kernel and
waits for it as the sweep's does)::

    python benchmarks/probes/call_steps.py [--runtime numpy|cupy] [--out FILE.json]

The growth probe (growth.py) stamps a call's steps as they happen, between processes; this
one times each piece of Python alone, warm, best of 5 repeats of ``timeit`` (us per call), so
that the remaining cost of a call can be read as a list of named pieces, each of which a
compiled hot path would have to replace:

- **client**: the pieces of ``Session.run(f, 5)`` on a one-slice sim broker's session (the
  connection look-up, the function pickle cache's check, the plain-argument test, the call
  id, the future, the request's pickle, reading a plain result), and the whole call;
- **executor**: an ``ExecutorServer`` in this process with a lane on a socket pair: the
  request already written, ``serve`` (read, unpickle, check, dispatch, stage) and ``run``
  (run the call, pickle and send its result) as the main thread does them, p50 over 18,000
  calls, and the same pieces one by one; and the number of Python function calls per call
  (``cProfile``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

sys.path.insert(0, str(Path(__file__).parents[1]))
from gpu_suite import running_broker
from overhead_sweep import native_spin, remote_spin

import mig_kernel
from mig_kernel import remote
from mig_kernel.datapath import Outgoing
from mig_kernel.testing import executor_in_process
from mig_kernel.wire import lane as lane_wire
from mig_kernel.wire.limits import check_body
from mig_kernel.wire.messages import Message

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def returns_none(x: Any) -> None:
    return None


def best_us(call: Callable[[], Any], n: int = 20000) -> float:
    return round(min(timeit.repeat(call, number=n, repeat=5)) / n * 1e6, 3)


def client_steps() -> dict[str, float]:
    fn = returns_none
    with (
        tempfile.TemporaryDirectory(prefix="mig-steps-") as tmp,
        running_broker(Path(tmp), "steps", "sim", 1, 1) as broker,
        mig_kernel.connect(broker=broker.connection_file, timeout=60) as session,
    ):
        for _ in range(2000):
            session.run(fn, 5)
        conn = session._connection()
        fn_data = remote._FUNCTIONS.dumps(fn)
        body = {"call_id": "abc1", "timeout": None, "fn": fn_data, "argv": ((5,), {})}
        timings = {"stage_in_ms": 0.0, "compute_ms": 0.01, "input_bytes": 0}
        reply = lane_wire.pack("result", {"call_id": "abc1", "timings": timings, "value": None})
        return {
            "whole call: session.run(f, 5)": best_us(lambda: session.run(fn, 5), 5000),
            "session._connection()": best_us(session._connection),
            "function pickle cache check": best_us(lambda: remote._FUNCTIONS.dumps(fn)),
            "plain-argument test": best_us(lambda: remote._plain_arguments((5,), {})),
            "call id": best_us(remote._call_id),
            "Outgoing()": best_us(Outgoing),
            "Invocation()": best_us(lambda: remote.Invocation(conn, "x", False, Outgoing(), None)),
            "request pickle (lane pack)": best_us(lambda: lane_wire.pack("invoke", body, ())),
            "reading a plain result": best_us(lambda: lane_wire.whole_message(reply)),
        }


def executor_steps(runtime: str, calls: int = 20000) -> dict[str, Any]:
    gpu = runtime == "cupy"
    fn, argv = (remote_spin, ((0,), {})) if gpu else (returns_none, ((5,), {}))
    with (
        tempfile.TemporaryDirectory(prefix="mig-steps-") as tmp,
        executor_in_process(Path(tmp), runtime) as (server, lane, theirs),
    ):
        fn_data = remote._FUNCTIONS.dumps(fn)

        def request(i: int) -> bytes:
            body = {"call_id": f"c{i}", "timeout": None, "fn": fn_data, "argv": argv}
            return lane_wire.pack("invoke", body, ())

        clock = time.perf_counter_ns
        spans: dict[str, list[float]] = {"serve": [], "run": []}

        def one(message: bytes, keep: bool) -> None:
            theirs.sendall(message)
            t0 = clock()
            server._serve_lane(lane, wait=False)
            t1 = clock()
            job = server.dataplane.next_ready()
            server._run(job)
            t2 = clock()
            theirs.recv(65536)
            if keep:
                spans["serve"].append((t1 - t0) / 1e3)
                spans["run"].append((t2 - t1) / 1e3)

        requests = [request(i) for i in range(calls)]
        for i, message in enumerate(requests):
            one(message, keep=i >= 2000)
        profile = cProfile.Profile()
        requests = [request(i) for i in range(5000)]
        profile.enable()
        for message in requests:
            one(message, keep=False)
        profile.disable()
        python_calls = pstats.Stats(profile).total_calls / len(requests)  # type: ignore[attr-defined]
        body = {"call_id": "c1", "timeout": None, "fn": fn_data, "argv": argv}
        msg = Message(type="invoke", body=body, id=b"", ts=0.0, payload=[])

        def stage() -> None:
            server.dataplane.submit(server._job("invoke", msg, lane.route, True))
            server.dataplane.next_ready()

        def stage_short() -> None:
            server.dataplane.queue(server._lane_job(lane, body))
            server.dataplane.next_ready()

        server.dataplane.submit(server._job("invoke", msg, lane.route, True))
        job = server.dataplane.next_ready()  # staged: its function loaded

        def run_only() -> None:
            job.staged = argv
            server.dataplane.run(job)

        timings = {"stage_in_ms": 0.0, "compute_ms": 0.01, "input_bytes": 0}
        packed = request(1)
        pieces = {
            "unpickle the request (lane _load)": best_us(lambda: lane_wire.whole_message(packed)),
            "Message()": best_us(lambda: Message("invoke", body, b"", 0.0, payload=[])),
            "check_body": best_us(lambda: check_body(body)),
            "make the job, stage it, take it (_job, submit, next_ready)": best_us(stage),
            "the same by the short path (_lane_job, queue, next_ready)": best_us(stage_short),
            f"run the call (DataPlane.run, {runtime})": best_us(run_only, 5000 if gpu else 20000),
            "pickle the result (lane pack)": best_us(
                lambda: lane_wire.pack("result", {"call_id": "c1", "timings": timings})
            ),
        }
        if gpu:  # what the call's own work costs in this process, for comparison
            native = native_spin(True)
            pieces["native: the same kernel launched and synchronized"] = best_us(
                lambda: native(0), 5000
            )
        return {
            "runtime": runtime,
            "serve_p50_us": round(statistics.median(spans["serve"]), 2),
            "run_and_reply_p50_us": round(statistics.median(spans["run"]), 2),
            "python_calls_per_call": round(python_calls, 1),
            "pieces_us": pieces,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="numpy", choices=("numpy", "cupy"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "load": list(os.getloadavg()),
        "client_us": client_steps(),
        "executor": executor_steps(args.runtime),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
