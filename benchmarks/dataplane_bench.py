"""Data-plane benchmarks on a CPU-only machine: mig-kernel (sim slice) side by side with Ray and
Dask distributed.

Usage::

    python benchmarks/dataplane_bench.py [--out benchmarks/results/dataplane-2core.json] [--quick]

Measured, p50 and p99 after warm-up, for each system in turn (each is started, measured and shut
down before the next one starts, so no system's idle daemons share the cores with another's run):

- empty invocation round trip: ``s.run(noop)``; a Ray actor method; a Dask
  ``client.submit(noop, pure=False).result()`` on one single-threaded worker process;
- a 4 KiB float64 argument sent and returned to host (identity function);
- a 64 MiB float64 argument sent and returned to host (result checked equal once);

and, mig-kernel only, 20 invocations with 16 MiB arguments computing about as long as their data
movement takes: all in flight through ``submit()`` versus one after another with ``run()``.

Ray and Dask are optional (``pip install ray "dask[distributed]"``); one that is missing or fails
is recorded as an error string and the others still run. Must be run as a script: functions
defined in ``__main__`` are pickled by value, so the executor and the workers need not import
this file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from broker_bench import machine, percentile

import mig_kernel
from mig_kernel.testing import BrokerProcess, all_free

LAYOUT = "H100-80GB:7x1g.10gb"
SMALL_BYTES = 4 * 2**10
BIG_BYTES = 64 * 2**20
PIPE_BYTES = 16 * 2**20
PIPE_COUNT = 20


# Functions that run remotely: module level, so every system can pickle them.
def noop() -> None:
    return None


def identity(x: Any) -> Any:
    return x


def work(a: Any, k: int) -> float:
    """About k passes of elementwise work over ``a`` (k = 0: the call only moves data)."""
    total = 0.0
    for _ in range(k):
        total += float(xp.sqrt(a).sum())  # noqa: F821 (xp: the slice's array module)
    return total


@dataclass
class Config:
    reps: int  # empty and 4 KiB round trips
    warmup: int
    big_reps: int  # 64 MiB round trips
    big_warmup: int
    pipe_rounds: int  # sequential/pipelined pairs, alternating


@dataclass
class Driver:
    """One system's way of making the calls measured: ``noop()`` and ``echo(x) -> host array``."""

    noop: Callable[[], Any]
    echo: Callable[[np.ndarray], Any]
    version: str


def timed(call: Callable[[], Any], reps: int, warmup: int) -> list[float]:
    samples = []
    for i in range(warmup + reps):
        t = time.perf_counter()
        call()
        dt = time.perf_counter() - t
        if i >= warmup:
            samples.append(dt)
    return samples


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "n": len(samples),
        "p50_ms": percentile(samples, 50) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3,
        "min_ms": min(samples) * 1e3,
        "max_ms": max(samples) * 1e3,
    }


def measure(driver: Driver, cfg: Config) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    small = rng.random(SMALL_BYTES // 8)
    big = rng.random(BIG_BYTES // 8)
    out: dict[str, Any] = {"version": driver.version}
    driver.noop()  # first call (function shipping, connection set-up) not timed
    out["empty"] = summary(timed(driver.noop, cfg.reps, cfg.warmup))
    back = driver.echo(small)
    out["echo_4KiB_equal"] = bool(isinstance(back, np.ndarray) and np.array_equal(back, small))
    out["echo_4KiB"] = summary(timed(lambda: driver.echo(small), cfg.reps, cfg.warmup))
    back = driver.echo(big)
    out["echo_64MiB_equal"] = bool(isinstance(back, np.ndarray) and np.array_equal(back, big))
    del back
    out["echo_64MiB"] = summary(timed(lambda: driver.echo(big), cfg.big_reps, cfg.big_warmup))
    return out


# ------------------------------------------------------------------------------- mig-kernel
@contextlib.contextmanager
def mig_kernel_system(
    notes: list[str], broker_args: Sequence[str] = ()
) -> Iterator[tuple[Driver, Any]]:
    """A sim broker (``broker_args`` added to its command line), one leased slice, and the
    driver of its noop/echo calls."""
    with tempfile.TemporaryDirectory(prefix="mig-dataplane-") as tmp:
        state = Path(tmp) / "state"
        broker = BrokerProcess(state, ["--backend", "sim", "--sim-layout", LAYOUT, *broker_args])
        broker.start()
        try:
            t = time.perf_counter()
            broker.wait_for(all_free, timeout=120)
            notes.append(f"broker ready (all slices free) in {time.perf_counter() - t:.2f} s")
            t = time.perf_counter()
            session = mig_kernel.connect(broker=broker.connection_file)
            notes.append(f"connect (lease grant) {(time.perf_counter() - t) * 1e3:.1f} ms")
            try:
                where = session.run(lambda: __import__("mig_kernel").__file__)
                notes.append(f"mig_kernel imported from {mig_kernel.__file__} (executor: {where})")
                yield (
                    Driver(
                        noop=lambda: session.run(noop),
                        echo=lambda x: session.run(identity, x, to_host=True),
                        version=mig_kernel.__version__,
                    ),
                    session,
                )
            finally:
                session.release()
        finally:
            code = broker.stop()
            if code:
                notes.append(f"broker exited with status {code}")
            notes.extend(log_problems([broker.log, *sorted((state / "logs").glob("*"))]))


def log_problems(paths: list[Path]) -> list[str]:
    """Lines of the broker's and executors' logs that look like trouble (a traceback as its
    last line, the exception), each with the logs it came from."""
    pattern = re.compile(r"WARNING|ERROR|CRITICAL|Warning|Exception")
    found: dict[str, list[str]] = {}
    for path in paths:
        with contextlib.suppress(OSError):
            lines = path.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if line.startswith("Traceback"):
                    end = next(
                        (j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")),
                        len(lines) - 1,
                    )
                    text = f"traceback ending {lines[end].strip()[:300]}"
                elif pattern.search(line) and not line.startswith(" "):
                    text = re.sub(r"^\d{4}-\d\d-\d\d [\d:,]+ ", "", line.strip())[:300]
                else:
                    continue
                found.setdefault(text, []).append(path.name)
    return [f"{text} [{', '.join(names)}]" for text, names in found.items()][:50]


def pipelining(session: Any, cfg: Config) -> dict[str, Any]:
    """20 invocations with 16 MiB arguments, each computing about as long as its call's data
    movement: all in flight through submit() vs one after another with run()."""
    rng = np.random.default_rng(2)
    arrays = [rng.random(PIPE_BYTES // 8) for _ in range(PIPE_COUNT)]
    # Calibrate: a copy-only call (data in, scalar back), and the cost of one pass of work.
    for a in arrays:  # warm: arena regions, the executor's pool buffers
        session.run(work, a, 0)
    copy_s = statistics.median(timed(lambda: session.run(work, arrays[0], 0), 9, 0))
    probe = session.submit(work, arrays[0], 20)
    probe.result()
    per_pass_ms = probe.timings["compute_ms"] / 20
    k = max(1, round(copy_s * 1e3 / per_pass_ms))

    def sequential() -> list[float]:
        return [session.run(work, a, k) for a in arrays]

    def pipelined() -> tuple[list[float], list[dict[str, float]]]:
        futures = [session.submit(work, a, k) for a in arrays]
        return [f.result() for f in futures], [f.timings for f in futures]

    expected = sequential()  # warm-up of both, and the reference results
    if pipelined()[0] != expected:
        raise AssertionError("pipelined results differ from sequential ones")
    seq_s, pipe_s = [], []
    timings: list[dict[str, float]] = []
    for _ in range(cfg.pipe_rounds):
        t = time.perf_counter()
        got = sequential()
        seq_s.append(time.perf_counter() - t)
        assert got == expected
        t = time.perf_counter()
        got, timings = pipelined()
        pipe_s.append(time.perf_counter() - t)
        assert got == expected
    seq, pipe = statistics.median(seq_s), statistics.median(pipe_s)
    return {
        "count": PIPE_COUNT,
        "bytes_each": PIPE_BYTES,
        "copy_only_call_ms": copy_s * 1e3,
        "compute_passes": k,
        "compute_ms_each": per_pass_ms * k,
        "rounds": cfg.pipe_rounds,
        "sequential_s": seq,
        "pipelined_s": pipe,
        "speedup": seq / pipe,
        "sequential_s_all": seq_s,
        "pipelined_s_all": pipe_s,
        "last_pipelined_stage_in_ms_p50": statistics.median(t["stage_in_ms"] for t in timings),
        "last_pipelined_compute_ms_p50": statistics.median(t["compute_ms"] for t in timings),
    }


# ------------------------------------------------------------------------------- Ray
@contextlib.contextmanager
def ray_system(notes: list[str]) -> Iterator[Driver]:
    import ray

    @ray.remote
    class Echo:
        def noop(self) -> None:
            return None

        def identity(self, x: Any) -> Any:
            return x

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = Echo.remote()
        ray.get(actor.noop.remote())
        notes.append(f"ray.init + first actor call {time.perf_counter() - t:.2f} s")
        yield Driver(
            noop=lambda: ray.get(actor.noop.remote()),
            echo=lambda x: ray.get(actor.identity.remote(x)),
            version=ray.__version__,
        )
        ray.kill(actor)
    finally:
        t = time.perf_counter()
        ray.shutdown()
        notes.append(f"ray.shutdown {time.perf_counter() - t:.2f} s")


# ------------------------------------------------------------------------------- Dask
@contextlib.contextmanager
def dask_system(notes: list[str]) -> Iterator[Driver]:
    import distributed
    from distributed import Client, LocalCluster

    t = time.perf_counter()
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        notes.append(f"LocalCluster + Client {time.perf_counter() - t:.2f} s")
        yield Driver(
            noop=lambda: client.submit(noop, pure=False).result(),
            echo=lambda x: client.submit(identity, x, pure=False).result(),
            version=distributed.__version__,
        )
        t = time.perf_counter()
    notes.append(f"Client + LocalCluster close {time.perf_counter() - t:.2f} s")


# ------------------------------------------------------------------------------- main
def run_system(name: str, body: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any]:
    """Run one system's phase; its failure becomes an error string, its warnings notes."""
    notes: list[str] = []
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = body(notes)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
            notes.append(traceback.format_exc(limit=5))
    seen: dict[str, int] = {}
    for w in caught:
        message = " ".join(str(w.message).split())[:200]
        text = f"{w.category.__name__}: {message} ({Path(w.filename).name}:{w.lineno})"
        seen[text] = seen.get(text, 0) + 1
    result["warnings"] = [f"{text} [x{n}]" for text, n in seen.items()]
    result["notes"] = notes
    result["phase_s"] = time.perf_counter() - start
    for line in notes + result["warnings"]:
        print(f"   {line.rstrip()}", flush=True)
    if "error" in result:
        print(f"   ERROR {result['error']}", flush=True)
    return result


def bench_mig_kernel(cfg: Config) -> Callable[[list[str]], dict[str, Any]]:
    def body(notes: list[str]) -> dict[str, Any]:
        with mig_kernel_system(notes) as (driver, session):
            result = measure(driver, cfg)
            result["pipelining"] = pipelining(session, cfg)
        return result

    return body


def bench_with(system: Any, cfg: Config) -> Callable[[list[str]], dict[str, Any]]:
    def body(notes: list[str]) -> dict[str, Any]:
        with system(notes) as driver:
            return measure(driver, cfg)

    return body


def table(results: dict[str, Any]) -> str:
    systems = ["mig_kernel", "ray", "dask"]
    rows = [
        ("empty", "empty round trip"),
        ("echo_4KiB", "4 KiB echo"),
        ("echo_64MiB", "64 MiB echo"),
    ]
    head = f"{'ms (p50 / p99)':<18}" + "".join(f"{s:>22}" for s in systems)
    lines = [head, "-" * len(head)]
    for key, label in rows:
        cells = []
        for s in systems:
            r = results.get(s, {})
            if "error" in r:
                cells.append("error")
            elif key in r:
                cells.append(f"{r[key]['p50_ms']:.3f} / {r[key]['p99_ms']:.3f}")
            else:
                cells.append("-")
        lines.append(f"{label:<18}" + "".join(f"{c:>22}" for c in cells))
    p = results.get("mig_kernel", {}).get("pipelining")
    if p:
        lines.append(
            f"mig-kernel {p['count']} x {p['bytes_each'] >> 20} MiB, {p['compute_passes']} passes "
            f"({p['compute_ms_each']:.1f} ms compute, {p['copy_only_call_ms']:.1f} ms copy-only "
            f"call): run() {p['sequential_s'] * 1e3:.0f} ms, submit() "
            f"{p['pipelined_s'] * 1e3:.0f} ms, speed-up {p['speedup']:.2f}x"
        )
    for s in systems:
        if "error" in results.get(s, {}):
            lines.append(f"{s}: {results[s]['error']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/dataplane-2core.json")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--reps", type=int, help="repetitions of the empty and 4 KiB calls")
    parser.add_argument("--big-reps", type=int, help="repetitions of the 64 MiB calls")
    parser.add_argument(
        "--systems", default="mig_kernel,ray,dask", help="comma-separated subset to run"
    )
    args = parser.parse_args()
    if args.quick:
        cfg = Config(reps=100, warmup=20, big_reps=5, big_warmup=2, pipe_rounds=1)
    else:
        cfg = Config(reps=2000, warmup=100, big_reps=30, big_warmup=3, pipe_rounds=5)
    cfg.reps = args.reps or cfg.reps
    cfg.big_reps = args.big_reps or cfg.big_reps
    results: dict[str, Any] = {"machine": machine(), "config": vars(cfg).copy()}
    results["config"]["quick"] = args.quick
    results["load_average_before"] = os.getloadavg()
    phases = {
        "mig_kernel": bench_mig_kernel(cfg),
        "ray": bench_with(ray_system, cfg),
        "dask": bench_with(dask_system, cfg),
    }
    start = time.perf_counter()
    for name in args.systems.split(","):
        results[name] = run_system(name, phases[name])
    results["total_s"] = time.perf_counter() - start
    results["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"total {results['total_s']:.1f} s; wrote {out}")


if __name__ == "__main__":
    main()
