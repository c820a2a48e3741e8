"""The CPU part of the performance report: what a node without a GPU (sim slices) measures.

Usage (``benchmarks/report.py --suite cpu`` runs it with the rest)::

    python benchmarks/cpu_suite.py [--quick] [--out benchmarks/results/cpu-suite.json]

Measured, each system started, measured and stopped before the next one starts (no system's
idle daemons share the two cores with another's run):

- invocation round trip, p50 and p99, for an empty call and a float64 argument of 4 KiB, 1, 16,
  64 and 256 MiB sent and returned to the host (identity function, the result checked equal
  once per size), for
  - ``mig_kernel``: the normal path, ipc socket + shared-memory arena;
  - ``mig_kernel_tcp``: the broker's ``--executor-transport tcp``: the same executor reached
    over 127.0.0.1, array data pickled through the socket (what network API remoting costs);
  - ``ray``: a Ray actor method (``ray.get(actor.identity.remote(x))``);
  - ``dask``: ``client.submit(identity, x, pure=False).result()`` on one single-threaded
    worker process of a LocalCluster;
- lease grant latency from the warm pool, acquire/release throughput with 50 clients on 7
  slices, and the broker's resident memory with 1,000 leases recorded (broker_bench's);
- cold executor start against a warm-pool grant: on a node of one slice, the lease that follows
  a used (hence replaced) executor waits for a new executor process to start and warm up; the
  same acquire while the slice's executor is warm is a pool grant.

Ray and Dask are optional (``pip install -e '.[bench]'``); a system that is missing or fails
is recorded as an error string and the others still run. Must run as a script or be imported
by report.py: functions defined here are pickled by value (``register_pickle_by_value``), so
executors and workers need not import this file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import dataplane_bench
from broker_bench import (
    bench_grant_latency,
    bench_memory,
    bench_throughput,
    machine,
    percentile,
)
from dataplane_bench import (
    Driver,
    dask_system,
    ray_system,
    run_system,
    summary,
    timed,
)

import mig_kernel
from mig_kernel.testing import BrokerProcess, all_free

cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(dataplane_bench)

LAYOUT = "H100-80GB:7x1g.10gb"
SYSTEMS = ("mig_kernel", "mig_kernel_tcp", "ray", "dask")
KiB, MiB = 2**10, 2**20


@dataclass(frozen=True)
class Size:
    """One round-trip case: ``nbytes`` None is the empty call; reps after warm-up."""

    name: str
    nbytes: int | None
    reps: int
    warmup: int


# name, bytes (None: the empty call), (reps, warm-up) full, (reps, warm-up) quick
CASES = [
    ("empty", None, (2000, 100), (100, 20)),
    ("4KiB", 4 * KiB, (2000, 100), (100, 20)),
    ("1MiB", MiB, (300, 20), (30, 5)),
    ("16MiB", 16 * MiB, (60, 5), (10, 2)),
    ("64MiB", 64 * MiB, (30, 3), (5, 2)),
    ("256MiB", 256 * MiB, (10, 2), (3, 1)),
]


def sizes(quick: bool) -> list[Size]:
    return [Size(name, nbytes, *(short if quick else full)) for name, nbytes, full, short in CASES]


def round_trips(driver: Driver, cases: list[Size]) -> dict[str, Any]:
    """Every size on one system; the result of each size is checked equal to its argument."""
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"version": driver.version}
    driver.noop()  # first call (function shipping, connection set-up) not timed
    for case in cases:
        if case.nbytes is None:
            out[case.name] = summary(timed(driver.noop, case.reps, case.warmup))
            continue
        arg = rng.random(case.nbytes // 8)
        back = driver.echo(arg)
        if not (isinstance(back, np.ndarray) and np.array_equal(back, arg)):
            raise AssertionError(f"{case.name}: the result differs from the argument")
        del back
        out[case.name] = {
            **summary(timed(lambda a=arg: driver.echo(a), case.reps, case.warmup)),
            "bytes": case.nbytes,
        }
        print(f"   {case.name}: p50 {out[case.name]['p50_ms']:.3f} ms", flush=True)
        del arg
    return out


@contextlib.contextmanager
def mig_kernel_system(notes: list[str], broker_args: list[str]) -> Iterator[Driver]:
    """dataplane_bench's mig-kernel system with ``broker_args`` (the transport)."""
    with dataplane_bench.mig_kernel_system(notes, broker_args) as (driver, session):
        endpoint = session.executor_endpoint or ""
        notes.append(f"executor endpoint scheme: {endpoint.split(':', 1)[0]}")
        yield driver


def cold_vs_warm(tmp: Path, rounds: int) -> dict[str, Any]:
    """On a node of one slice: a grant while its executor is warm (the pool) against the
    acquire right after a used lease ended, which waits for a fresh executor process (the
    used one exits: nothing of a tenant survives) to start, import NumPy and warm up."""
    broker = BrokerProcess(tmp / "cold", ["--backend", "sim", "--sim-layout", "H100-80GB:7g.80gb"])
    broker.start()
    warm_grant, warm_first, cold_grant, cold_first = [], [], [], []
    try:
        for _ in range(rounds):
            broker.wait_for(all_free, timeout=120)
            time.sleep(0.2)  # the warm executor is idle, as a pool's is
            t0 = time.perf_counter()
            session = mig_kernel.connect(broker=broker.connection_file)
            t1 = time.perf_counter()
            session.run(dataplane_bench.noop)
            t2 = time.perf_counter()
            session.release()  # the executor ran tenant code: it is replaced
            t3 = time.perf_counter()
            session = mig_kernel.connect(broker=broker.connection_file)  # waits for the new one
            t4 = time.perf_counter()
            session.run(dataplane_bench.noop)
            t5 = time.perf_counter()
            session.release()
            warm_grant.append(t1 - t0)
            warm_first.append(t2 - t1)
            cold_grant.append(t4 - t3)
            cold_first.append(t5 - t4)
    finally:
        broker.stop()

    def ms(values: list[float]) -> dict[str, float]:
        return {"p50_ms": percentile(values, 50) * 1e3, "p99_ms": percentile(values, 99) * 1e3}

    return {
        "rounds": rounds,
        "warm_pool_grant": ms(warm_grant),
        "warm_first_call": ms(warm_first),
        "cold_start_grant": ms(cold_grant),
        "cold_first_call": ms(cold_first),
        "cold_over_warm_p50": percentile(cold_grant, 50) / percentile(warm_grant, 50),
    }


def run_cpu_suite(*, quick: bool = False, systems: tuple[str, ...] = SYSTEMS) -> dict[str, Any]:
    cases = sizes(quick)
    results: dict[str, Any] = {
        "machine": machine(),
        "quick": quick,
        "sizes": [vars(c) for c in cases],
        "load_average_before": os.getloadavg(),
    }
    started = time.perf_counter()

    def with_driver(system: Callable[..., Any], *extra: Any) -> Callable[[list[str]], Any]:
        def body(notes: list[str]) -> dict[str, Any]:
            with system(notes, *extra) as driver:
                return round_trips(driver, cases)

        return body

    phases: dict[str, Callable[[list[str]], dict[str, Any]]] = {
        "mig_kernel": with_driver(mig_kernel_system, []),
        "mig_kernel_tcp": with_driver(mig_kernel_system, ["--executor-transport", "tcp"]),
        "ray": with_driver(ray_system),
        "dask": with_driver(dask_system),
    }
    results["round_trip"] = {name: run_system(name, phases[name]) for name in systems}
    with tempfile.TemporaryDirectory(prefix="mig-cpu-suite-cp-") as tmp:
        print("== control plane", flush=True)
        results["grant_latency"] = bench_grant_latency(Path(tmp), 300 if quick else 3000)
        print(f"   grant {results['grant_latency']}", flush=True)
        results["throughput"] = bench_throughput(
            Path(tmp), "throughput", "H100-80GB:7x1g.10gb", 50, 2, 3.0 if quick else 10.0
        )
        print(f"   throughput {results['throughput']}", flush=True)
        results["memory"] = bench_memory(Path(tmp), 200 if quick else 1000)
        print(f"   memory {results['memory']}", flush=True)
        results["cold_vs_warm"] = cold_vs_warm(Path(tmp), 3 if quick else 10)
        print(f"   cold vs warm {results['cold_vs_warm']}", flush=True)
    results["total_s"] = time.perf_counter() - started
    results["load_average_after"] = os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cpu-suite.json")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    args = parser.parse_args()
    results = run_cpu_suite(quick=args.quick, systems=tuple(args.systems.split(",")))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"total {results['total_s']:.1f} s; wrote {out}")


if __name__ == "__main__":
    main()
