"""Issue 15's two plots, from the raw results (no figure typed in by hand)::

    python benchmarks/plots_overhead.py --sweep benchmarks/results/issue15/h200-run2/sweep.json \
        --floor benchmarks/results/issue15/cpu-floor*.json --out docs/perf

``gpu-overhead-sweep.png``: remoted minus native p50 against the call's GPU time (lane, lane
without the client's spin, signed ZeroMQ) with the target; ``cpu-floor.png``: p50 of each
system per floor.py run. ``--tag T`` names them ``gpu-overhead-sweep-T.png`` and
``cpu-floor-T.png`` (a later pass's plots beside the earlier ones).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

VARIANTS = {
    "remoted": "lane (default)",
    "lane_nospin": "lane, no client spin",
    "zmq": "signed ZeroMQ",
}
SYSTEMS = {
    "pyzmq": "bare pyzmq ipc",
    "pipe": "os.pipe",
    "python_rpc": "Python RPC floor",
    "mig_kernel": "mig-kernel, lane",
    "mig_kernel_handles": "lane, 2 handles",
    "mig_kernel_zmq": "mig-kernel, ZeroMQ",
    "ray": "Ray actor",
}


def sweep_plot(sweep: dict[str, Any], path: Path) -> None:
    rows = sweep["sweep"]
    lengths = [int(k.removesuffix("us")) for k in rows]
    x = [max(length, 10) / 1000 for length in lengths]  # ms; 0 drawn at 10 us (log axis)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in VARIANTS.items():
        ax.plot(x, [rows[k][key]["overhead_us"] for k in rows], marker="o", label=label)
    ax.plot(x, [rows[k][key]["target_us"] - rows[k]["native"]["p50_us"] for k in rows], "k--",
            label="target: 40 us + 1% of native")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("GPU time of the call, ms (0 drawn at 0.01)")
    ax.set_ylabel("remoted - native, p50, us")
    cupy = sweep["machine"].get("cupy", {})
    ax.set_title(f"Invocation overhead, {cupy.get('device', '?')}, {sweep['started'][:16]}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def floor_plot(runs: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [run["interleaved"].get(k, {}).get("p50_us") for k in SYSTEMS if k != "ray"]
        values.append(run["ray"].get("p50_us"))
        xs = [j + i * width for j in range(len(SYSTEMS))]
        label = f"{run['started'][11:19]} (load {run['load_before'][0]:.2f})"
        ax.bar(xs, [v or 0 for v in values], width, label=label)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(SYSTEMS))])
    ax.set_xticklabels(list(SYSTEMS.values()), rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("empty round trip, p50, us")
    ax.set_title(f"CPU floor, {runs[0]['machine']['cpu_count']}-core CPU machine, floor.py runs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, help="overhead_sweep.py's JSON (else no GPU plot)")
    parser.add_argument("--floor", type=Path, nargs="+", help="floor.py's JSONs (else no CPU plot)")
    parser.add_argument("--out", type=Path, default=Path("docs/perf"))
    parser.add_argument("--tag", default="", help="appended to the file names (a pass's plots)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    if args.sweep:
        sweep_plot(json.loads(args.sweep.read_text()), args.out / f"gpu-overhead-sweep{tag}.png")
    if args.floor:
        runs = [json.loads(p.read_text()) for p in args.floor]
        floor_plot(runs, args.out / f"cpu-floor{tag}.png")


if __name__ == "__main__":
    main()
