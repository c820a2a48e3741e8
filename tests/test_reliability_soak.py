"""The reliability soak: N client processes x M checked invocations with idle reclaims, while
a fixed-seed schedule SIGKILLs and SIGSTOPs the broker, executors and clients at random
moments. Afterwards: no slice was ever granted twice, no result was wrong, and no process,
arena segment or socket file is left; the broker's memory and descriptors stayed bounded.

CI runs the short version; ``make soak`` the long one (100 x 100, marked ``soak``: the default
run leaves it out), whose figures docs/reliability.md quotes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mig_kernel.broker.registry import broker_tag
from mig_kernel.procs import pid_alive, proc_start_ticks
from mig_kernel.testing import BrokerProcess, all_free, executor_pids, wait_until

from .support.accounts import PYTHONPATH as CHECKOUT_PATH  # this checkout, then what we import

REPO = Path(__file__).resolve().parents[1]
LAYOUT = "H100-80GB:4x1g.10gb"
FAULTS = (
    "kill_broker",
    "stop_broker",
    "kill_executor",
    "stop_executor",
    "kill_client",
    "stop_client",
)


@dataclass
class Figures:
    """What one soak measured (printed; docs/reliability.md quotes the long run's)."""

    clients: int
    invocations: int
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    leases: int = 0
    double_grants: int = 0
    broker_rss_mib: list[float] = field(default_factory=list)
    broker_fds: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "invocations_each": self.invocations,
            "seconds": round(self.seconds, 1),
            "faults": dict(self.faults),
            "results": dict(self.counts),
            "errors_seen_by_clients": dict(self.errors),
            "leases_in_state": self.leases,
            "double_grants": self.double_grants,
            "broker_rss_mib_first_max": [
                round(self.broker_rss_mib[0], 1),
                round(max(self.broker_rss_mib), 1),
            ],
            "broker_fds_first_max": [self.broker_fds[0], max(self.broker_fds)],
        }


def start_client(broker: BrokerProcess, invocations: int, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.soak_client",
            str(broker.connection_file),
            str(invocations),
            str(seed),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONPATH=CHECKOUT_PATH),
    )


def sample(broker: BrokerProcess, figures: Figures) -> None:
    """The broker's resident memory and open descriptors, now."""
    assert broker.proc is not None
    pid = broker.proc.pid
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")
    figures.broker_rss_mib.append(rss_kib / 1024)
    figures.broker_fds.append(fds)


def inject(
    fault: str, broker: BrokerProcess, clients: list[subprocess.Popen[str]], rng: random.Random
) -> bool:
    """One fault; False where it had no target (no live executor or client)."""
    live = [c for c in clients if c.poll() is None]
    if fault == "kill_broker":
        broker.kill()
        time.sleep(rng.uniform(0.1, 1.0))
        broker.start()
    elif fault == "stop_broker":
        _pause(broker.proc.pid if broker.proc else 0, rng.uniform(0.3, 1.5))
    elif fault in ("kill_executor", "stop_executor"):
        pids = [p for p in executor_pids(broker.state_dir).values() if pid_alive(p)]
        if not pids:
            return False
        pid = rng.choice(sorted(pids))
        if fault == "kill_executor":
            os.kill(pid, signal.SIGKILL)
        else:
            _pause(pid, rng.uniform(0.3, 1.5))
    elif not live:
        return False
    elif fault == "kill_client":
        rng.choice(live).kill()
    else:
        _pause(rng.choice(live).pid, rng.uniform(0.3, 1.5))
    return True


def _pause(pid: int, seconds: float) -> None:
    try:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def double_grants(state_dir: Path) -> tuple[int, int]:
    """(leases overlapping another on the same slice, leases recorded), from SQLite."""
    db = sqlite3.connect(str(state_dir / "broker.sqlite"))
    try:
        rows = db.execute("SELECT slice_id, created, ended FROM leases ORDER BY created").fetchall()
    finally:
        db.close()
    last_end: dict[str, float | None] = {}
    overlaps = 0
    for slice_id, created, ended in rows:
        if slice_id in last_end:
            previous = last_end[slice_id]
            if previous is None or previous > created:
                overlaps += 1
        last_end[slice_id] = ended
    return overlaps, len(rows)


def executors_running(state_dir: Path) -> list[int]:
    marker = f"--broker-tag\0{broker_tag(state_dir)}".encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline and proc_start_ticks(int(name)) is not None:
                found.append(int(name))
    return found


def run_soak(
    tmp_path: Path, clients: int, invocations: int, *, seed: int, concurrent: int, limit: float
) -> Figures:
    rng = random.Random(seed)
    figures = Figures(clients, invocations)
    state = tmp_path / "state"
    broker = BrokerProcess(
        state,
        [
            "--backend",
            "sim",
            "--sim-layout",
            LAYOUT,
            "--LeasePolicy.per_user_limit=all",
            "--Broker.sweep_interval=1",
            "--Broker.heartbeat_interval=1",
            "--Broker.stats_interval=0.5",
        ],
        (str(REPO),),
    )
    broker.start()
    broker.wait_for(all_free)
    sockets = Path(json.loads(broker.connection_file.read_text())["endpoint"][6:]).parent
    started = time.monotonic()
    waiting = list(range(clients))
    running: list[subprocess.Popen[str]] = []
    finished: list[subprocess.Popen[str]] = []
    client_pids: list[int] = []
    try:
        while waiting or running:
            while waiting and len(running) < concurrent:
                proc = start_client(broker, invocations, seed * 1000 + waiting.pop())
                running.append(proc)
                client_pids.append(proc.pid)
            time.sleep(rng.uniform(0.3, 1.5))
            sample(broker, figures)
            fault = rng.choice(FAULTS)
            if inject(fault, broker, running, rng):
                figures.faults[fault] += 1
            for proc in [p for p in running if p.poll() is not None]:
                running.remove(proc)
                finished.append(proc)
            assert time.monotonic() - started < limit, "the clients did not finish in time"
        figures.seconds = time.monotonic() - started
        for proc in finished:
            out = proc.stdout.read() if proc.stdout else ""
            if proc.returncode == 0 and out.strip():
                report = json.loads(out.strip().splitlines()[-1])
                figures.counts.update(report["counts"])
                figures.errors.update(report["errors"])
            else:
                figures.counts["clients_killed"] += 1
        broker.wait_for(all_free, timeout=60)
        sample(broker, figures)
        # Leftovers of killed clients: swept while the broker runs.
        wait_until(
            lambda: (
                not [
                    n
                    for n in os.listdir("/dev/shm")
                    if any(f"-p{pid}t" in n for pid in client_pids)
                ]
            ),
            20,
            "arena segments of the soak's clients swept",
        )
        figures.double_grants, figures.leases = double_grants(state)
        assert broker.stop() == 0
        wait_until(lambda: not executors_running(state), 20, "no executor of the soak left")
        assert [n for n in os.listdir(sockets) if n.endswith(".sock")] == []
    finally:
        for proc in running + finished:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        broker.stop()
    return figures


def check(figures: Figures) -> None:
    summary = figures.summary()
    print("reliability soak:", json.dumps(summary))
    assert figures.double_grants == 0
    assert figures.counts["wrong"] == 0
    assert figures.counts["ok"] > 0 and figures.counts["kept_ok"] > 0
    assert max(figures.broker_rss_mib) < 250, summary
    assert max(figures.broker_fds) < 200, summary


def test_soak_short(tmp_path: Path) -> None:
    """CI's version: 10 clients x 10 invocations, 4 slices, faults every 0.3-1.5 s."""
    check(run_soak(tmp_path, 10, 10, seed=14, concurrent=10, limit=150))


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_long(tmp_path: Path) -> None:
    """``make soak``: 100 clients x 100 invocations, 20 at a time."""
    check(run_soak(tmp_path, 100, 100, seed=1414, concurrent=20, limit=3000))
