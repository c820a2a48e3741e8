"""PNG plots of a report's results (report.py): one figure per comparison, each titled with
the machine it ran on. A figure whose results are missing or failed is skipped with a line
saying why; the other figures are still drawn."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from targets import at, lookup

SYSTEM_LABELS = {
    "mig_kernel": "mig-kernel (ipc + shared memory)",
    "mig_kernel_tcp": "mig-kernel over tcp (data pickled)",
    "ray": "Ray actor",
    "dask": "Dask worker",
}
COLOURS = {
    "mig_kernel": "#1f77b4",
    "mig_kernel_tcp": "#17becf",
    "ray": "#ff7f0e",
    "dask": "#2ca02c",
}
NATIVE, REMOTED = "#7f7f7f", "#1f77b4"


def machine_line(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    cards = lookup(results, ("gpu", "gpu"))
    gpu = cards[0].get("name") if isinstance(cards, list) and cards else None
    parts = [f"{m.get('cores', '?')} cores", m.get("cpu") or "", f"Python {m.get('python', '?')}"]
    if gpu:
        parts.insert(0, str(gpu))
    return ", ".join(p for p in parts if p) + f" ({m.get('date', '')[:10]})"


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def round_trip(results: dict[str, Any], path: Path) -> Path | None:
    """p50 (solid) and p99 (dashed) round trip by argument size, one line per system."""
    rt = lookup(results, ("cpu", "round_trip"))
    sizes = lookup(results, ("cpu", "sizes"))
    if not rt or not sizes:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = [s["name"] for s in sizes]
    x = list(range(len(names)))
    for system, data in rt.items():
        if "error" in data:
            continue
        p50 = [lookup(data, (n, "p50_ms")) for n in names]
        p99 = [lookup(data, (n, "p99_ms")) for n in names]
        colour = COLOURS.get(system)
        label = SYSTEM_LABELS.get(system, system)
        left.plot(x, p50, "o-", color=colour, label=f"{label} p50")
        left.plot(x, p99, "x--", color=colour, alpha=0.6, label=f"{label} p99")
        moved = [(i, s) for i, s in enumerate(sizes) if s["nbytes"]]
        rate = [
            2 * s["nbytes"] / (lookup(data, (s["name"], "p50_ms")) / 1e3) / 1e9 for _, s in moved
        ]
        right.plot([i for i, _ in moved], rate, "o-", color=colour, label=label)
    left.set_yscale("log")
    left.set_ylabel("round trip, ms (log)")
    left.set_title("invocation round trip by argument size")
    right.set_yscale("log")
    right.set_ylabel("GB/s moved (argument + result, p50)")
    right.set_title("effective bandwidth")
    for ax in (left, right):
        ax.set_xticks(x, names)
        ax.set_xlabel("argument (float64, returned to host)")
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle(machine_line(results), fontsize=9)
    return _save(fig, path)


def _bars(ax: Any, labels: list[str], groups: dict[str, list[float | None]], colours: list[str]):
    width = 0.8 / max(1, len(groups))
    for i, ((name, values), colour) in enumerate(zip(groups.items(), colours, strict=False)):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(labels))]
        shown = [v if v is not None else 0 for v in values]
        bars = ax.bar(xs, shown, width, label=name, color=colour)
        for bar, v in zip(bars, values, strict=True):
            text = "n/a" if v is None else (f"{v:.3g}")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(labels)), labels)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def control_plane(results: dict[str, Any], path: Path) -> Path | None:
    grant = lookup(results, ("cpu", "grant_latency"))
    cold = lookup(results, ("cpu", "cold_vs_warm"))
    if not grant or not cold:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _bars(
        left,
        ["grant", "release"],
        {
            "p50": [grant["grant_p50_ms"], grant["release_p50_ms"]],
            "p99": [grant["grant_p99_ms"], grant["release_p99_ms"]],
        },
        ["#1f77b4", "#aec7e8"],
    )
    left.axhline(2, color="red", linestyle=":", label="p50 target 2 ms")
    left.set_ylabel("ms")
    left.set_title("lease grant and release, client round trip")
    keys = ["warm_pool_grant", "cold_start_grant", "warm_first_call", "cold_first_call"]
    _bars(
        right,
        ["warm-pool grant", "cold-start grant", "first call (warm)", "first call (cold)"],
        {"p50": [cold[k]["p50_ms"] for k in keys], "p99": [cold[k]["p99_ms"] for k in keys]},
        ["#1f77b4", "#aec7e8"],
    )
    right.set_yscale("log")
    right.set_ylabel("ms (log)")
    right.set_title("warm pool vs cold executor start (sim executor)")
    fig.suptitle(machine_line(results), fontsize=9)
    return _save(fig, path)


def workloads(results: dict[str, Any], path: Path) -> Path | None:
    w = results.get("workloads")
    if not isinstance(w, dict) or "error" in w:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, name, title in ((axes[0], "resnet", "ResNet-style inference"), (axes[1], "bfs", "BFS")):
        data = w.get(name) or {}
        _bars(
            ax,
            ["p50", "p99"],
            {
                "native (in-process)": [lookup(data, ("native", k)) for k in ("p50_ms", "p99_ms")],
                "remoted (mig-kernel)": [
                    lookup(data, ("remoted", k)) for k in ("p50_ms", "p99_ms")
                ],
            },
            [NATIVE, REMOTED],
        )
        ax.set_ylabel("ms per request")
        ax.set_title(title)
    fig.suptitle(machine_line(results), fontsize=9)
    return _save(fig, path)


WG = ("gpu", "whole_gpu")


def _num(results: dict[str, Any], *path: str) -> float | None:
    return at(*path)(results)


def gpu_calls(results: dict[str, Any], path: Path) -> Path | None:
    """Small-kernel call: in-process vs remoted; cold start vs warm grant + first call."""
    if lookup(results, (*WG, "small_kernel")) is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sk = (*WG, "small_kernel")
    _bars(
        left,
        ["p50", "p99"],
        {
            "native CuPy, in-process": [
                _num(results, *sk, "native_p50_us"), _num(results, *sk, "native_p99_us")
            ],
            "mig-kernel, whole GPU": [
                _num(results, *sk, "remoted_p50_us"), _num(results, *sk, "remoted_p99_us")
            ],
        },
        [NATIVE, REMOTED],
    )  # fmt: skip
    left.set_ylabel("us per call (a * 2 on 1,024 floats, synchronized)")
    left.set_title("small-kernel call")
    cold = _num(results, "gpu", "native_cold_start", "process_total_s")
    warm = _num(results, *WG, "warm_first_call", "grant_plus_first_call_ms")
    ex_cold = _num(results, *WG, "executor_cold_start", "release_to_first_answer_s_best")
    _bars(
        right,
        ["native cold start", "executor cold start", "warm grant + first call"],
        {
            "seconds": [
                cold,
                ex_cold,
                warm / 1e3 if warm is not None else None,
            ]
        },
        [REMOTED],
    )
    right.set_yscale("log")
    right.set_ylabel("seconds (log)")
    right.set_title("time to a first GPU result")
    fig.suptitle(machine_line(results), fontsize=9)
    return _save(fig, path)


def gpu_bandwidth(results: dict[str, Any], path: Path) -> Path | None:
    h2d, d2h = lookup(results, (*WG, "h2d")), lookup(results, (*WG, "d2h"))
    if h2d is None and d2h is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.4))
    _bars(
        ax,
        ["H2D (1 GiB)", "D2H (1 GiB)"],
        {
            "mig-kernel arena": [
                _num(results, *WG, "h2d", "arena_h2d_GBps"),
                _num(results, *WG, "d2h", "get_GBps"),
            ],
            "pinned cudaMemcpy": [
                _num(results, *WG, "h2d", "pinned_memcpy_GBps"),
                _num(results, *WG, "d2h", "native", "d2h_pinned_GBps"),
            ],
            "pageable cudaMemcpy": [
                _num(results, *WG, "h2d", "pageable_memcpy_GBps"),
                _num(results, *WG, "d2h", "native", "d2h_pageable_GBps"),
            ],
        },
        [REMOTED, "#2ca02c", NATIVE],
    )
    ax.set_ylabel("GB/s")
    ax.set_title("host <-> device bandwidth (arena: H2D CUDA events, D2H client wall)")
    fig.suptitle(machine_line(results), fontsize=9)
    return _save(fig, path)


def gpu_pipeline_spill(results: dict[str, Any], path: Path) -> Path | None:
    pipe, spill = lookup(results, (*WG, "pipelining")), lookup(results, (*WG, "spill_restore"))
    if pipe is None and spill is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _bars(
        left,
        ["run() one after another", "submit() all in flight"],
        {"seconds": [_num(results, *WG, "pipelining", "sequential_s"),
                     _num(results, *WG, "pipelining", "pipelined_s")]},
        [REMOTED],
    )  # fmt: skip
    count = _num(results, *WG, "pipelining", "count") or 0
    size = (_num(results, *WG, "pipelining", "bytes_each") or 0) / 2**20
    left.set_title(f"{count:.0f} invocations x {size:.0f} MiB")
    left.set_ylabel("seconds")
    sr = (*WG, "spill_restore")
    gib = (_num(results, *sr, "bytes") or 0) / 2**30
    _bars(
        right,
        ["device -> host", "host -> device"],
        {
            "mig-kernel suspend / restore": [
                _num(results, *sr, "suspend_s_best"), _num(results, *sr, "first_call_after_s_best")
            ],
            "raw copy, pinned": [
                _ms_to_s(_num(results, *sr, "native", "d2h_pinned_ms_best")),
                _ms_to_s(_num(results, *sr, "native", "h2d_pinned_ms_best")),
            ],
            "raw copy, pageable": [
                _ms_to_s(_num(results, *sr, "native", "d2h_pageable_ms_best")),
                _ms_to_s(_num(results, *sr, "native", "h2d_pageable_ms_best")),
            ],
            "copy to new arrays + np.save / np.load + copy": [
                _sum(_ms_to_s(_num(results, *sr, "native", "d2h_fresh_numpy_wall_ms_best")),
                     _num(results, *sr, "host_files", "np_save_s")),
                _sum(_num(results, *sr, "host_files", "np_load_s"),
                     _ms_to_s(_num(results, *sr, "native", "h2d_pageable_ms_best"))),
            ],
        },
        [REMOTED, "#2ca02c", NATIVE, "#9467bd"],
    )  # fmt: skip
    right.set_title(f"spill and restore of {gib:.2f} GiB of device arrays")
    right.set_ylabel("seconds")
    fig.suptitle(machine_line(results), fontsize=9)
    return _save(fig, path)


def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def _ms_to_s(value: float | None) -> float | None:
    return None if value is None else value / 1e3


def gpu_sharing(results: dict[str, Any], path: Path) -> Path | None:
    shared = lookup(results, ("gpu", "shared_gpu"))
    inter = lookup(results, ("gpu", "interference"))
    if not isinstance(shared, dict) and not isinstance(inter, dict):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    shares = sorted(k for k in (shared or {}) if k.startswith("share_"))
    _bars(
        left,
        [f"{k.split('_')[1]} executors" for k in shares],
        {
            "others idle, p50": [_num(results, "gpu", "shared_gpu", k, "others_idle_us", "p50")
                                 for k in shares],
            "all running, p50": [_num(results, "gpu", "shared_gpu", k, "all_running_us", "p50")
                                 for k in shares],
            "all running, p99": [_num(results, "gpu", "shared_gpu", k, "all_running_us", "p99")
                                 for k in shares],
        },
        ["#aec7e8", REMOTED, "#08306b"],
    )  # fmt: skip
    left.set_ylabel("us per small-kernel call")
    left.set_title("several executors sharing one GPU (process isolation)")
    labels, alone, loaded = [], [], []
    for system, name in (("mig_kernel_process", "mig-kernel"), ("native_processes", "native")):
        for metric in ("small_kernel_us", "medium_matmul_executor_ms"):
            for q in ("p50", "p99"):
                a = _num(results, "gpu", "interference", system, "b_alone", metric, q)
                b = _num(results, "gpu", "interference", system, "b_with_a", metric, q)
                if a is None and b is None:
                    continue
                kind = "small" if metric.startswith("small") else "matmul"
                labels.append(f"{name}\n{kind} {q}")
                alone.append(1.0 if a else None)
                loaded.append(b / a if a and b is not None else None)
    _bars(right, labels, {"B alone": alone, "B while A runs heavy matmuls": loaded},
          ["#aec7e8", "#d62728"])  # fmt: skip
    right.set_ylabel("B's latency, relative to B alone")
    right.set_title("interference, process isolation\n(MIG would remove it; not measured on MIG)")
    right.tick_params(axis="x", labelsize=7)
    fig.suptitle(machine_line(results), fontsize=9)
    return _save(fig, path)


FIGURES: dict[str, list[tuple[str, Callable[[dict[str, Any], Path], Path | None]]]] = {
    "cpu": [("round-trip", round_trip), ("control-plane", control_plane)],
    "gpu": [
        ("calls", gpu_calls),
        ("bandwidth", gpu_bandwidth),
        ("pipeline-spill", gpu_pipeline_spill),
        ("sharing", gpu_sharing),
    ],
    "any": [("workloads", workloads)],
}


def draw(results: dict[str, Any], out_dir: Path, *, prefix: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = []
    for name, figure in FIGURES.get(prefix, []) + FIGURES["any"]:
        try:
            path = figure(results, out_dir / f"{prefix}-{name}.png")
        except Exception:
            print(f"plot {name} failed:\n{traceback.format_exc(limit=4)}", flush=True)
            continue
        if path is None:
            print(f"plot {name}: no results for it", flush=True)
        else:
            drawn.append(path)
    return drawn
