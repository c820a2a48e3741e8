"""Where an invocation's time goes, by sampling both processes with py-spy (issue 15).

Usage::

    python benchmarks/probes/profile_calls.py [--backend sim|nvml] [--seconds 6]
                                              [--spin-us 0] [--out DIR]

A one-slice broker; the client calls ``session.run(fn)`` back to back for ``--seconds`` (fn
launches a spin kernel of ``--spin-us`` on a GPU slice, waits as long on a sim slice; 0: an
empty call) while ``py-spy record --nonblocking`` samples the client and the executor. Writes
``client.txt`` and ``executor.txt`` (collapsed stacks, idle frames included) and
``summary.json``: per process, the share of samples of each function (self and inclusive),
and the calls made.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cloudpickle

sys.path.insert(0, str(Path(__file__).parents[1]))
from gpu_suite import running_broker
from overhead_sweep import remote_sim_spin, remote_spin

import mig_kernel

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def summarize(path: Path, top: int = 30) -> dict[str, Any]:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    share = lambda c: [(k, round(v / total * 100, 1)) for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "self_pct": share(own), "inclusive_pct": share(inclusive)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="sim", choices=("sim", "nvml"))
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--spin-us", type=int, default=0)
    parser.add_argument("--rate", type=int, default=997)
    parser.add_argument("--out", type=Path, default=Path("profile-out"))
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    fn = remote_spin if args.backend == "nvml" else remote_sim_spin
    ns = args.spin_us * 1000
    with (
        tempfile.TemporaryDirectory(prefix="mig-profile-") as tmp,
        running_broker(Path(tmp), "profile", args.backend, 1, 1) as broker,
        mig_kernel.connect(broker=broker.connection_file, timeout=120) as session,
    ):
        for _ in range(300):
            session.run(fn, ns)
        executor_pid = session.run(os.getpid)
        duration = max(2, int(args.seconds))
        spies = [
            subprocess.Popen(
                [spy, "record", "--nonblocking", "--idle", "-r", str(args.rate), "-d",
                 str(duration), "-f", "raw", "-o", str(args.out / f"{name}.txt"), "-p", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for name, pid in (("client", os.getpid()), ("executor", executor_pid))
        ]  # fmt: skip
        time.sleep(0.5)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < duration - 1:
            session.run(fn, ns)
            calls += 1
        elapsed = time.perf_counter() - started
        errors = [p.communicate(timeout=60)[1].decode(errors="replace")[-500:] for p in spies]
    summary = {
        "backend": args.backend,
        "spin_us": args.spin_us,
        "calls": calls,
        "us_per_call_while_sampled": elapsed / max(1, calls) * 1e6,
        "py_spy_stderr": errors,
    }
    for name in ("client", "executor"):
        path = args.out / f"{name}.txt"
        if path.exists():
            summary[name] = summarize(path)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1)[:5000])


if __name__ == "__main__":
    main()
