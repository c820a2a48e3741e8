"""Control-plane benchmarks: lease grant latency, acquire/release throughput, broker memory.

Runs real broker processes (sim backend) and real clients over ipc, and writes a JSON file of
results. Usage::

    python benchmarks/broker_bench.py [--out benchmarks/results/broker.json] [--quick]

Targets (control-plane issue): grant from the warm pool p50 <= 2 ms and p99 <= 10 ms; >= 1,000
acquire/release pairs per second with 50 concurrent clients; broker RSS <= 100 MB with 1,000
leases recorded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mig_kernel.client import BrokerClient
from mig_kernel.testing import BrokerProcess, all_free


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def start(tmp: Path, name: str, layout: str, *args: str) -> BrokerProcess:
    broker = BrokerProcess(tmp / name, ["--backend", "sim", "--sim-layout", layout, *args])
    broker.start()
    broker.wait_for(all_free, timeout=120)
    return broker


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def bench_grant_latency(tmp: Path, pairs: int) -> dict[str, Any]:
    """One client, acquire(wait=False) then release, back to back: the client-side round trip
    of a grant from the warm pool (7 free slices, so the just-released slice's rekey never
    blocks the next grant)."""
    broker = start(tmp, "latency", "H100-80GB:7x1g.10gb", "--LeasePolicy.per_user_limit=1")
    try:
        grants: list[float] = []
        releases: list[float] = []
        with BrokerClient(broker.connection_file) as client:
            for i in range(pairs + 100):
                t0 = time.perf_counter()
                lease = client.acquire(wait=False)
                t1 = time.perf_counter()
                client.release(lease["id"])
                t2 = time.perf_counter()
                if i >= 100:  # warm-up
                    grants.append(t1 - t0)
                    releases.append(t2 - t1)
        return {
            "pairs": pairs,
            "grant_p50_ms": percentile(grants, 50) * 1e3,
            "grant_p99_ms": percentile(grants, 99) * 1e3,
            "grant_mean_ms": statistics.fmean(grants) * 1e3,
            "release_p50_ms": percentile(releases, 50) * 1e3,
            "release_p99_ms": percentile(releases, 99) * 1e3,
        }
    finally:
        broker.stop()


def _client_worker(
    connection_file: str, clients: int, duration: float, start_at: float, out: Any
) -> None:
    """One process driving ``clients`` threads, each looping acquire(wait=True) + release."""
    counts = [0] * clients
    errors = [0] * clients
    stop_at = start_at + duration

    def loop(i: int) -> None:
        with BrokerClient(connection_file) as client:
            while time.time() < start_at:
                time.sleep(0.001)
            while time.time() < stop_at:
                try:
                    lease = client.acquire(wait=True, timeout=30)
                    client.release(lease["id"])
                    counts[i] += 1
                except Exception:
                    errors[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((sum(counts), sum(errors)))


def bench_throughput(
    tmp: Path, name: str, layout: str, clients: int, processes: int, duration: float
) -> dict[str, Any]:
    broker = start(tmp, name, layout, f"--LeasePolicy.per_user_limit={clients}")
    try:
        queue: multiprocessing.Queue = multiprocessing.Queue()
        start_at = time.time() + 2.0
        per = [
            clients // processes + (1 if i < clients % processes else 0) for i in range(processes)
        ]
        procs = [
            multiprocessing.Process(
                target=_client_worker,
                args=(str(broker.connection_file), n, duration, start_at, queue),
            )
            for n in per
        ]
        for p in procs:
            p.start()
        results = [queue.get(timeout=duration + 120) for _ in procs]
        for p in procs:
            p.join()
        pairs = sum(r[0] for r in results)
        errors = sum(r[1] for r in results)
        slices = len(broker.status()["slices"])
        return {
            "layout": layout,
            "slices": slices,
            "clients": clients,
            "client_processes": processes,
            "duration_s": duration,
            "pairs": pairs,
            "errors": errors,
            "pairs_per_s": pairs / duration,
        }
    finally:
        broker.stop()


def bench_memory(tmp: Path, leases: int) -> dict[str, Any]:
    broker = start(tmp, "memory", "H100-80GB:7x1g.10gb")
    try:
        assert broker.proc is not None
        before = rss_bytes(broker.proc.pid)
        with BrokerClient(broker.connection_file) as client:
            for _ in range(leases):
                client.release(client.acquire(wait=True, timeout=30)["id"])
            status = client.status()
        after = rss_bytes(broker.proc.pid)
        import sqlite3

        db = sqlite3.connect(str(broker.state_dir / "broker.sqlite"))
        recorded = db.execute("SELECT COUNT(*) FROM leases").fetchone()[0]
        db.close()
        return {
            "leases_recorded": recorded,
            "rss_start_mb": before / 2**20,
            "rss_after_mb": after / 2**20,
            "slices": len(status["slices"]),
        }
    finally:
        broker.stop()


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass  # no /proc/cpuinfo model line: the report leaves the CPU name empty
    return {
        "host": platform.node(),
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/broker.json")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    args = parser.parse_args()
    pairs = 200 if args.quick else 3000
    duration = 3.0 if args.quick else 10.0
    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="mig-bench-") as tmp_name:
        tmp = Path(tmp_name)
        results["grant_latency"] = bench_grant_latency(tmp, pairs)
        print("grant latency", json.dumps(results["grant_latency"]), flush=True)
        big_node = ";".join(["H100-80GB:7x1g.10gb"] * 8)
        results["throughput_56_slices"] = bench_throughput(tmp, "tp56", big_node, 50, 2, duration)
        print("throughput (56 slices)", json.dumps(results["throughput_56_slices"]), flush=True)
        results["throughput_7_slices"] = bench_throughput(
            tmp, "tp7", "H100-80GB:7x1g.10gb", 50, 2, duration
        )
        print("throughput (7 slices)", json.dumps(results["throughput_7_slices"]), flush=True)
        results["memory"] = bench_memory(tmp, 200 if args.quick else 1000)
        print("memory", json.dumps(results["memory"]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
