"""The performance report's one entry point: every comparison of a machine in one run, one JSON
file of results, PNG plots, and the targets of the earlier issues judged met or missed.

Usage::

    python benchmarks/report.py --suite cpu [--quick]    # the 2-core CPU machine (sim slices)
    python benchmarks/report.py --suite gpu [--quick]    # a machine with an NVIDIA GPU
    python benchmarks/report.py --plots-from FILE.json   # plots and targets again from results
    python benchmarks/report.py --suite gpu --from-dir DIR  # merge scripts/gpu-report's files

``--suite cpu`` runs cpu_suite.py (round trips against Ray and Dask, the control plane, cold vs
warm executors), workloads.py on a sim slice and notebook_bench.py; ``--suite gpu`` runs
gpu_suite.py (native CuPy as the floor, the whole GPU and shares of it, bandwidth, pipelining,
spill and restore, interference, cold start), workloads.py on the GPU and notebook_bench.py.
Results go to ``benchmarks/results/report-<suite>.json``, plots to ``docs/perf/<suite>-*.png``
and the target table to ``benchmarks/results/report-<suite>-targets.md`` (pasted into
docs/performance.md). Plots need matplotlib (``pip install -e '.[bench]'``); a machine without
it still writes the JSON, and ``--plots-from`` makes the plots elsewhere. The GPU machine runs
the GPU suite in parts (scripts/gpu-report, one file per part, within the device's limit per
command); ``--from-dir`` merges those files into the same report JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import targets

HERE = Path(__file__).parent
RESULTS = HERE / "results"
PLOTS = HERE.parent / "docs" / "perf"


def section(name: str, body: Callable[[], Any]) -> Any:
    """One part of the run; its failure is recorded and the other parts still run."""
    print(f"==== {name}", flush=True)
    started = time.perf_counter()
    try:
        result = body()
    except Exception:
        result = {"error": traceback.format_exc(limit=8)}
        print(result["error"], flush=True)
    if isinstance(result, dict):
        result.setdefault("section_s", time.perf_counter() - started)
    return result


def script(name: str, *args: str) -> dict[str, Any]:
    """A benchmark script in its own process, its JSON result read back: each part starts on
    a clean process (no threads or imports left by an earlier part, such as Ray's)."""
    with tempfile.TemporaryDirectory(prefix="mig-report-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HERE / name), *args, "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr[-3000:]}")
        return json.loads(out.read_text())


def notebook_bench(backend: str, quick: bool) -> dict[str, Any]:
    starts, cells = ("4", "50") if quick else ("10", "200")
    return script("notebook_bench.py", "--backend", backend, "--starts", starts, "--cells", cells)


def workloads(backend: str, quick: bool) -> dict[str, Any]:
    extra = ["--quick", "--requests", "30"] if quick else ["--requests", "200"]
    return script("workloads.py", "--backend", backend, *extra)


def run(suite: str, quick: bool) -> dict[str, Any]:
    from broker_bench import machine

    results: dict[str, Any] = {"suite": suite, "quick": quick, "machine": machine()}
    if suite == "cpu":
        import cpu_suite

        results["cpu"] = section("cpu suite", lambda: cpu_suite.run_cpu_suite(quick=quick))
        results["workloads"] = section("workloads (sim)", lambda: workloads("sim", quick))
        results["notebook"] = section("notebook (sim)", lambda: notebook_bench("sim", quick))
    else:
        import gpu_suite

        results["gpu"] = section("gpu suite", lambda: gpu_suite.run_gpu_suite(quick=quick))
        results["workloads"] = section("workloads (gpu)", lambda: workloads("nvml", quick))
        results["notebook"] = section("notebook (gpu)", lambda: notebook_bench("nvml", quick))
    return results


def merge(directory: Path) -> dict[str, Any]:
    """The GPU report from scripts/gpu-report's files (gpu-suite.json, workloads.json,
    notebook.json, machine.txt): the same shape ``run("gpu", ...)`` returns."""

    def part(name: str) -> dict[str, Any]:
        path = directory / name
        if not path.exists():
            return {"error": f"{name} was not produced by scripts/gpu-report"}
        return json.loads(path.read_text())

    gpu = part("gpu-suite.json")
    machine = dict(gpu.get("machine") or {})
    machine_txt = directory / "machine.txt"
    if machine_txt.exists():
        machine["nvidia_smi"] = machine_txt.read_text().strip()
    return {
        "suite": "gpu",
        "quick": bool(gpu.get("quick")),
        "machine": machine,
        "gpu": gpu,
        "workloads": part("workloads.json"),
        "notebook": part("notebook.json"),
    }


def publish(results: dict[str, Any], stem: str) -> None:
    """The target table next to the results, and the plots (when matplotlib is there)."""
    table = targets.markdown(targets.evaluate(results))
    (RESULTS / f"{stem}-targets.md").write_text(table)
    print(table, flush=True)
    try:
        import plots
    except ImportError as exc:
        print(f"no plots ({exc}); make them elsewhere with --plots-from", flush=True)
        return
    for path in plots.draw(results, PLOTS, prefix=results["suite"]):
        print(f"plot {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["cpu", "gpu"])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--out", type=Path, help="results JSON (default by suite)")
    parser.add_argument("--plots-from", type=Path, help="only plots and targets, from a JSON")
    parser.add_argument("--from-dir", type=Path, help="merge scripts/gpu-report's files")
    args = parser.parse_args()
    if args.from_dir:
        results = merge(args.from_dir)
        out = args.out or RESULTS / "report-gpu.json"
        out.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {out}", flush=True)
        publish(results, out.stem)
        return
    if args.plots_from:
        results = json.loads(args.plots_from.read_text())
        publish(results, args.plots_from.stem)
        return
    if not args.suite:
        parser.error("--suite or --plots-from is required")
    results = run(args.suite, args.quick)
    out = args.out or RESULTS / f"report-{args.suite}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out}", flush=True)
    publish(results, out.stem)


if __name__ == "__main__":
    main()
