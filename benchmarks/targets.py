"""The targets of the control-plane, data-plane and notebook issues, judged against a report's
results (report.py): each is met, missed, or not measured in that run (with why).

A target names where its figure sits in the results (a path of keys) and how the figure is
judged; nothing here is typed in by hand from a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Path = tuple[str, ...]


def lookup(results: dict[str, Any], path: Path) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


@dataclass(frozen=True)
class Target:
    issue: str
    what: str
    goal: str  # as the issue states it
    figure: Callable[[dict[str, Any]], float | None]
    met: Callable[[float], bool]
    unit: str
    suite: str  # the suite that measures it: cpu or gpu


def at(*path: str) -> Callable[[dict[str, Any]], float | None]:
    def get(results: dict[str, Any]) -> float | None:
        value = lookup(results, path)
        return float(value) if isinstance(value, (int, float)) else None

    return get


def ratio(top: Path, bottom: Path) -> Callable[[dict[str, Any]], float | None]:
    def get(results: dict[str, Any]) -> float | None:
        a, b = lookup(results, top), lookup(results, bottom)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            return float(a) / float(b)
        return None

    return get


def difference(a: Path, b: Path) -> Callable[[dict[str, Any]], float | None]:
    def get(results: dict[str, Any]) -> float | None:
        x, y = lookup(results, a), lookup(results, b)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            return float(x) - float(y)
        return None

    return get


RT = ("cpu", "round_trip")
WG = ("gpu", "whole_gpu")  # gpu_suite: mig-kernel on the whole GPU
TARGETS = [
    Target(
        "2", "lease grant from the warm pool, p50", "<= 2 ms",
        at("cpu", "grant_latency", "grant_p50_ms"), lambda v: v <= 2, "ms", "cpu",
    ),
    Target(
        "2", "lease grant from the warm pool, p99", "<= 10 ms",
        at("cpu", "grant_latency", "grant_p99_ms"), lambda v: v <= 10, "ms", "cpu",
    ),
    Target(
        "2", "acquire/release pairs per second, 50 clients, 7 slices", ">= 1,000/s",
        at("cpu", "throughput", "pairs_per_s"), lambda v: v >= 1000, "/s", "cpu",
    ),
    Target(
        "2", "broker resident memory, 1,000 leases recorded", "<= 100 MB",
        at("cpu", "memory", "rss_after_mb"), lambda v: v <= 100, "MB", "cpu",
    ),
    Target(
        "3", "empty invocation round trip, p50", "<= 0.150 ms",
        at(*RT, "mig_kernel", "empty", "p50_ms"), lambda v: v <= 0.150, "ms", "cpu",
    ),
    Target(
        "3", "empty round trip: Ray actor p50 / mig-kernel p50", ">= 6x",
        ratio((*RT, "ray", "empty", "p50_ms"), (*RT, "mig_kernel", "empty", "p50_ms")),
        lambda v: v >= 6, "x", "cpu",
    ),
    Target(
        "3", "64 MiB argument sent and returned to host, p50", "<= 40 ms",
        at(*RT, "mig_kernel", "64MiB", "p50_ms"), lambda v: v <= 40, "ms", "cpu",
    ),
    Target(
        "3", "first call on a warm executor (GPU)", "<= 20 ms",
        at(*WG, "warm_first_call", "first_call_ms"), lambda v: v <= 20, "ms", "gpu",
    ),
    Target(
        "3", "small-kernel overhead, remoted minus in-process, p50 (GPU)", "<= 100 us",
        at(*WG, "small_kernel", "overhead_p50_us"), lambda v: v <= 100, "us", "gpu",
    ),
    Target(
        "3", "H2D from the arena / pinned cudaMemcpy (GPU)", ">= 80%",
        at(*WG, "h2d", "arena_over_pinned"), lambda v: v >= 0.8, "ratio", "gpu",
    ),
    Target(
        "3", "20 x 256 MiB invocations, submit() over run() (GPU)", ">= 1.6x",
        at(*WG, "pipelining", "speedup"), lambda v: v >= 1.6, "x", "gpu",
    ),
    Target(
        "4", "kernel start, eager mig kernel / plain ipykernel, p50", "<= 1.5x",
        at("notebook", "kernel_start_ratio_p50"), lambda v: v <= 1.5, "x", "any",
    ),
    Target(
        "4", "first %%gpufunc cell on a warm pool, inside the kernel, p50", "<= 30 ms",
        at("notebook", "first_gpufunc_cell_ms", "inside_kernel_after_attach", "p50"),
        lambda v: v <= 30, "ms", "any",
    ),
    Target(
        "4", "empty %%gpufunc cell minus empty cell, p50", "<= 2 ms",
        difference(
            ("notebook", "empty_cell_ms", "gpufunc", "p50"),
            ("notebook", "empty_cell_ms", "plain", "p50"),
        ),
        lambda v: v <= 2, "ms", "any",
    ),
]  # fmt: skip


def _shown(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value * 100:.0f}%"
    if unit in ("x", "/s"):
        return f"{value:,.2f}{unit}" if unit == "x" else f"{value:,.0f}/s"
    return f"{value:,.3f} {unit}" if value < 10 else f"{value:,.1f} {unit}"


def evaluate(results: dict[str, Any]) -> list[dict[str, str]]:
    suite = results.get("suite", "")
    rows = []
    for t in TARGETS:
        if t.suite not in ("any", suite):
            continue
        value = t.figure(results)
        if value is None:
            part = results.get("notebook" if t.suite == "any" else t.suite)
            error = "the figure is missing from the results"
            if isinstance(part, dict) and "error" in part:
                error = str(part["error"]).strip().splitlines()[-1]
            measured, verdict = "-", f"not measured ({error[:120]})"
        else:
            measured, verdict = _shown(value, t.unit), "met" if t.met(value) else "**missed**"
        rows.append(
            {"issue": t.issue, "what": t.what, "target": t.goal, "measured": measured,
             "verdict": verdict}
        )  # fmt: skip
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    lines = ["| issue | what | target | measured | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r['issue']} | {r['what']} | {r['target']} | {r['measured']} | {r['verdict']} |"
              for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"
