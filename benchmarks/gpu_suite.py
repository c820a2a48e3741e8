"""GPU benchmarks for the performance report: native CuPy, whole GPU, shared GPU, interference.

In one run: native in-process CuPy (no isolation) as the floor, mig-kernel on the whole GPU (one
`process` slice), and mig-kernel with several executors sharing the GPU (``--share N``: N
memory-capped `process` slices).

Run on the GPU machine (MIG is read, never changed)::

    python benchmarks/gpu_suite.py [--backend nvml|sim] [--quick] [--reps N] [--shares 2,4]
                                   [--only SECTION,...] [--out FILE]

``--backend sim`` runs every code path on a CPU machine (NumPy executors; "device" copies are
host copies, so its numbers mean nothing); the parts that need CUDA events are skipped there,
each with the reason in the results. The results JSON is rewritten after every section, so a
run that dies keeps what it measured. Each section fails soft: an exception is recorded as
``{"error": traceback}`` and the other sections still run.

Sections (clocks: "wall" is ``time.perf_counter`` in the process named; "events" is CUDA
events around the copies on the GPU):

- ``native_cold_start`` (gpu_dataplane): a new process imports CuPy, creates the context and
  runs a first kernel with an empty kernel cache (wall, in the child).
- whole GPU, one broker with one slice (``--share 1``), a fresh session per section:
  ``warm_first_call`` (gpu_dataplane: grant from the warm pool + first call, client wall);
  ``small_kernel`` (gpu_dataplane: ``a * 2`` on 1,024 floats, in-process vs remoted, wall);
  ``h2d`` (gpu_dataplane: 1 GiB arena stage-in from the executor's events vs pinned and
  pageable ``cudaMemcpy`` in-process, events); ``d2h`` (1 GiB device -> host: the executor
  does not time fetches, so the client wall time of ``RemoteArray.get()`` and of
  ``run(..., to_host=True)``, vs pinned and pageable in-process copies, events, and a copy into
  a fresh numpy array, wall); ``pipelining`` (gpu_dataplane: 20 x 256 MiB, ``submit`` vs
  ``run``); ``spill_restore`` (4 x 256 MiB RemoteArrays: ``Session.suspend()`` (the broker's
  ``release`` with ``spill``), then the first call after it, which leases again and restores,
  client wall; bit-identical check; vs in-process copies of the same arrays, events, and
  ``np.save``/``np.load`` of them on the spill's filesystem, wall); ``executor_cold_start``
  (release a used lease, lease again at once: the request waits for the replacement executor;
  release -> grant and the first call, client wall; the executor's own warm-up from its log;
  process start (/proc, 10 ms ticks) -> grant).
- ``shared_gpu`` share_N (N = 2 and 4): N sessions hold the N slices; each measures the small
  kernel with the others idle, then all at once (one thread per session), client wall.
- ``interference_mig_kernel``: two `process` slices (``--share 2``); tenant A runs 8192 x 8192
  float32 matmuls back to back (two calls in flight) while tenant B measures the small kernel
  and a 2048 x 2048 matmul (client wall, and the executor's ``compute_ms``, which includes the
  stream synchronize); B alone vs B with A, and A's matmul rate alone vs with B.
- ``interference_native``: the same two workloads as two plain CuPy processes (wall in B's
  process), to tell the GPU's sharing from mig-kernel's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from broker_bench import machine, percentile
from gpu_dataplane import (
    arena_h2d_ms,
    h2d_bandwidth,
    native_cold_start,
    native_small_kernel_times,
    pipelining,
    remoted_small_kernel_times,
    small_kernel_overhead,
    warm_first_call,
)

import mig_kernel
from mig_kernel.procs import pid_alive, proc_start_ticks
from mig_kernel.testing import BrokerProcess, all_free, executor_pids

MiB = 2**20
GiB = 2**30
FREE_TIMEOUT = 180.0  # seconds to wait for every slice's executor to be warm again

INTERFERENCE_NOTE = (
    "In `process` isolation the tenants share the GPU's SMs, L2 cache and memory bandwidth: the "
    "GPU time-slices between their contexts, so one tenant's heavy kernels delay another's. MIG "
    "would give each tenant its own SMs, L2 slices and memory, and remove this interference. "
    "Not measured on MIG: the card had MIG disabled, and this suite never changes MIG mode."
)

SECTIONS = (
    "native_cold_start",
    "warm_first_call",
    "small_kernel",
    "call_breakdown",
    "h2d",
    "d2h",
    "pipelining",
    "spill_restore",
    "executor_cold_start",
    "shared_gpu",
    "interference_mig_kernel",
    "interference_native",
)
WHOLE_GPU = SECTIONS[1:9]


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes and repetition counts. The defaults keep one run on an H100/H200 to a few
    minutes; ``quick()`` is a smoke test (and what the CPU machine runs on sim)."""

    reps: int = 500  # small-kernel calls per measurement (after 50 warm-up calls)
    copy_bytes: int = GiB  # H2D / D2H transfer size
    copy_reps: int = 5
    pipeline_count: int = 20
    pipeline_bytes: int = 256 * MiB
    spill_arrays: int = 4
    spill_array_bytes: int = 256 * MiB
    spill_reps: int = 3  # suspend + restore cycles
    cold_reps: int = 3  # executor replacements
    shares: tuple[int, ...] = (2, 4)
    heavy_n: int = 8192  # tenant A's square float32 matmul
    heavy_per_call: int = 4  # matmuls per invocation (native: per synchronize)
    heavy_alone_s: float = 3.0  # how long A's rate is measured without B
    heavy_max_s: float = 180.0  # a native heavy process stops by itself after this
    medium_n: int = 2048  # tenant B's square float32 matmul
    medium_reps: int = 50
    # B's small-kernel calls in the interference sections: fewer than ``reps``, as each may wait
    # for A's time slice on the GPU (the run must stay well inside its time budget)
    interference_reps: int = 300

    @classmethod
    def quick(cls, **overrides: Any) -> SuiteConfig:
        values: dict[str, Any] = {
            "reps": 50,
            "copy_bytes": 64 * MiB,
            "copy_reps": 3,
            "pipeline_count": 4,
            "pipeline_bytes": 16 * MiB,
            "spill_arrays": 4,
            "spill_array_bytes": 16 * MiB,
            "spill_reps": 2,  # two cycles: a restored session must suspend again
            "cold_reps": 2,
            "heavy_n": 512,
            "heavy_per_call": 2,
            "heavy_alone_s": 1.0,
            "heavy_max_s": 60.0,
            "medium_n": 256,
            "medium_reps": 10,
            "interference_reps": 50,
        }
        values.update(overrides)
        return cls(**values)


# ------------------------------------------------------------------------------- small helpers
def _stats(values: list[float], scale: float = 1e6) -> dict[str, float]:
    """p50 / p99 / mean of ``values`` (seconds) in the unit ``scale`` gives (1e6: us)."""
    return {
        "p50": percentile(values, 50) * scale,
        "p99": percentile(values, 99) * scale,
        "mean": sum(values) / len(values) * scale,
        "n": len(values),
    }


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms / 1e3) / 1e9


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape, dtype and bytes (NaNs included): what a restore must bring back."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))
    )


def _jsonable(obj: Any) -> Any:
    """json.dumps fallback: numpy scalars and arrays as Python values, anything else as text."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _brief(value: Any, limit: int = 1200) -> str:
    """One progress line: lists of raw samples left out."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if not k.endswith("_all")}
        if isinstance(v, list) and len(v) > 6:
            return f"[{len(v)} values]"
        if isinstance(v, float):
            return round(v, 4)
        return v

    text = json.dumps(strip(value), default=_jsonable)
    return text if len(text) <= limit else text[:limit] + " ..."


def _free_cupy_pools() -> None:
    """Give back what in-process measurements cached, so the GPU's memory is the executors'."""
    with contextlib.suppress(ImportError):
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()


def _filesystem(path: Path) -> dict[str, str]:
    """The mount (device, point, type) holding ``path``: a spill's speed depends on it."""
    best = ("", "", "")
    resolved = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            device, point, fstype = line.split()[:3]
            inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[1]):
                best = (device, point, fstype)
    return {"device": best[0], "mount": best[1], "type": best[2]}


def nvidia_smi() -> list[dict[str, str]]:
    """The GPUs as nvidia-smi names them (read-only query)."""
    fields = ["name", "driver_version", "memory.total", "mig.mode.current", "compute_mode", "uuid"]
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [
        dict(zip(fields, (x.strip() for x in line.split(",")), strict=False))
        for line in out.stdout.strip().splitlines()
    ]


def cupy_info() -> dict[str, Any]:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    return {
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        "device": name.decode() if isinstance(name, bytes) else name,
        "multiprocessors": props["multiProcessorCount"],
    }


# ------------------------------------------------------------------------------- brokers
def _broker_args(backend: str, share: int, per_user_limit: int) -> list[str]:
    """nvml: the real GPU split ``share`` ways (1: whole); sim: as many simulated slices."""
    if backend == "nvml":
        args = ["--backend", "nvml", "--share", str(share)]
    elif backend == "sim":
        layout = "H100-80GB:7g.80gb" if share == 1 else f"H100-80GB:{share}x1g.10gb"
        args = ["--backend", "sim", "--sim-layout", layout]
    else:
        raise ValueError(f"unknown backend {backend!r}: expected nvml or sim")
    return [*args, "--per-user-limit", str(per_user_limit)]


@contextlib.contextmanager
def running_broker(
    tmp: Path, name: str, backend: str, share: int, per_user_limit: int
) -> Iterator[BrokerProcess]:
    """A broker on its own state dir, every executor warm; always stopped at the end (if it
    must be killed, the executors it recorded are stopped by pid so none is left on the GPU)."""
    broker = BrokerProcess(tmp / name, _broker_args(backend, share, per_user_limit))
    try:
        broker.start()
        broker.wait_for(all_free, timeout=FREE_TIMEOUT)
        yield broker
    finally:
        try:
            broker.stop()
        except Exception:
            print(f"broker {name} did not stop cleanly: {traceback.format_exc()}", flush=True)
            _stop_recorded_executors(broker)


def _stop_recorded_executors(broker: BrokerProcess) -> None:
    with contextlib.suppress(Exception):
        for pid in executor_pids(broker.state_dir).values():
            if pid and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)


WARM_LINE = re.compile(r"executor (E-\S+) warm in ([0-9.]+) s \((\w+)\)")


def executor_warm_seconds(broker: BrokerProcess) -> list[dict[str, Any]]:
    """Every executor's own warm-up (import, context, first kernel), from the executor logs."""
    found = []
    for log in sorted((broker.state_dir / "logs").glob("*.log")):
        for match in WARM_LINE.finditer(log.read_text(errors="replace")):
            found.append(
                {
                    "slice": log.stem,
                    "executor": match[1],
                    "warm_s": float(match[2]),
                    "runtime": match[3],
                }
            )
    return found


def log_tails(broker: BrokerProcess, chars: int = 3000) -> dict[str, str]:
    """The end of the broker's and executors' logs, kept when a section failed (the state dir
    is temporary)."""
    paths = [broker.log, *sorted((broker.state_dir / "logs").glob("*.log"))]
    tails = {}
    for path in paths:
        with contextlib.suppress(OSError):
            tails[path.name] = path.read_text(errors="replace")[-chars:]
    return tails


def transport(session: Any) -> str:
    """The executor transport a lease uses (``ipc``: shared-memory arena; ``tcp``: data in the
    messages), read from its endpoint."""
    return (session.executor_endpoint or "?").split("://", 1)[0]


def with_session(broker: BrokerProcess, fn: Callable[[Any], Any]) -> Any:
    """``fn(session)`` on a fresh lease once every executor is warm (a used executor is being
    replaced after the previous section: its warm-up must not overlap a measurement)."""
    broker.wait_for(all_free, timeout=FREE_TIMEOUT)
    with mig_kernel.connect(broker=broker.connection_file, timeout=FREE_TIMEOUT) as session:
        return fn(session)


# ------------------------------------------------------------------------------- in-process copies
def native_copy_ms(sizes: list[int], reps: int) -> dict[str, Any]:
    """In-process CuPy copies of device arrays of ``sizes`` bytes, all of them back to back,
    in each direction: with pinned host buffers and with pre-touched pageable ones (CUDA events
    around the copies), and device -> a fresh numpy array per array (``get()``, wall: what the
    spill does). Milliseconds per rep for the whole set."""
    import cupy
    import cupyx

    devices = []
    for n in sizes:
        device = cupy.empty(n, dtype=cupy.uint8)
        device.fill(7)
        devices.append(device)
    pinned = [cupyx.empty_pinned(n, dtype=np.uint8) for n in sizes]
    for buffer in pinned:
        buffer.fill(1)
    pageable = [np.ones(n, dtype=np.uint8) for n in sizes]
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    cupy.cuda.Device().synchronize()

    def timed(copy: Callable[[], None]) -> float:
        start.record()
        copy()
        end.record()
        end.synchronize()
        return float(cupy.cuda.get_elapsed_time(start, end))

    def d2h(hosts: list[np.ndarray]) -> Callable[[], None]:
        def copy() -> None:
            for device, host in zip(devices, hosts, strict=True):
                device.get(out=host)

        return copy

    def h2d(hosts: list[np.ndarray]) -> Callable[[], None]:
        def copy() -> None:
            for device, host in zip(devices, hosts, strict=True):
                device.set(host)

        return copy

    ms: dict[str, list[float]] = {
        "d2h_pinned": [],
        "d2h_pageable": [],
        "h2d_pinned": [],
        "h2d_pageable": [],
        "d2h_fresh_numpy_wall": [],
    }
    for _ in range(reps):
        ms["d2h_pinned"].append(timed(d2h(pinned)))
        ms["d2h_pageable"].append(timed(d2h(pageable)))
        ms["h2d_pinned"].append(timed(h2d(pinned)))
        ms["h2d_pageable"].append(timed(h2d(pageable)))
        t = time.perf_counter()
        fresh = [device.get() for device in devices]
        ms["d2h_fresh_numpy_wall"].append((time.perf_counter() - t) * 1e3)
        del fresh
    total = sum(sizes)
    result: dict[str, Any] = {"bytes": total, "arrays": len(sizes)}
    for kind, values in ms.items():
        result[f"{kind}_ms_best"] = min(values)
        result[f"{kind}_GBps"] = _gbps(total, min(values))
        result[f"{kind}_ms_all"] = values
    for buffers in (devices, pinned, pageable):
        buffers.clear()  # the closures hold the lists: empty them to free the memory
    _free_cupy_pools()
    return result


def _skipped_native(backend: str) -> dict[str, str]:
    return {"skipped": f"needs CuPy on an NVIDIA GPU; backend {backend!r} has none"}


# ------------------------------------------------------------------------------- whole GPU
def small_kernel_section(session: Any, reps: int, native: bool, backend: str) -> dict[str, Any]:
    """gpu_dataplane's comparison on a GPU; the remoted half alone on sim."""
    if native:
        result = small_kernel_overhead(session, reps)
        _free_cupy_pools()
        return result
    remote = remoted_small_kernel_times(session, reps)
    return {
        "remoted_p50_us": percentile(remote, 50) * 1e6,
        "remoted_p99_us": percentile(remote, 99) * 1e6,
        "native": _skipped_native(backend),
    }


def call_breakdown_section(session: Any, reps: int) -> dict[str, Any]:
    """Where a small-kernel call's time goes: the same round trip with less and less work,
    interleaved in rounds of 50 so each variant sees the same machine. ``empty_call`` is the
    floor of the remoting path (no argument, no kernel, None back); ``kernel_kept`` adds a
    device argument, the kernel, a stream synchronize and a RemoteArray result (its handle
    freed when dropped); ``kernel_kept_new_lambda`` is small_kernel's own loop (a new lambda
    object each call); ``kernel_scalar`` returns a float instead of a handle. The executor's
    own time for the kernel (``compute_ms``: the function and its synchronize) comes from
    ``submit().timings``. Client wall (perf_counter), microseconds."""
    rx = session.put(np.ones(1024, dtype=np.float32))

    def noop() -> None:
        return None

    def double(a: Any) -> Any:
        return a * 2

    def double_scalar(a: Any) -> float:
        return float((a * 2)[0])

    variants: dict[str, Callable[[], Any]] = {
        "empty_call": lambda: session.run(noop),
        "kernel_kept": lambda: session.run(double, rx),
        "kernel_kept_new_lambda": lambda: session.run(lambda a: a * 2, rx),
        "kernel_scalar": lambda: session.run(double_scalar, rx),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for call in variants.values():  # warm-up: kernels compiled, functions cached
        for _ in range(20):
            call()
    rounds = max(1, reps // 50)
    for _ in range(rounds):
        for name, call in variants.items():
            for _ in range(50):
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
    compute = []
    for _ in range(100):
        invocation = session.submit(double, rx)
        invocation.result()
        compute.append(invocation.timings["compute_ms"] / 1e3)
    result: dict[str, Any] = {name: _stats(values) for name, values in times.items()}
    result["executor_compute_us"] = _stats(compute)
    result["clock"] = "client wall (perf_counter), us; executor_compute_us: submit().timings"
    return result


def h2d_section(session: Any, cfg: SuiteConfig, native: bool, backend: str) -> dict[str, Any]:
    """gpu_dataplane's H2D comparison on a GPU; the arena's stage-in alone on sim (wall)."""
    if native:
        result = h2d_bandwidth(session, cfg.copy_bytes)
        result["transport"] = transport(session)
        _free_cupy_pools()
        return result
    host = np.random.default_rng(0).integers(0, 255, size=cfg.copy_bytes, dtype=np.uint8)
    arena_ms = arena_h2d_ms(session, host, cfg.copy_reps)
    return {
        "bytes": cfg.copy_bytes,
        "arena_h2d_GBps": _gbps(cfg.copy_bytes, min(arena_ms)),
        "arena_h2d_ms_all": arena_ms,
        "clock": "executor wall time (sim has no CUDA events)",
        "transport": transport(session),
        "native": _skipped_native(backend),
    }


def d2h_section(session: Any, cfg: SuiteConfig, native: bool, backend: str) -> dict[str, Any]:
    """Device -> host of one array through the arena. The executor reports no timing for a
    fetch (``Invocation.timings`` has stage_in_ms and compute_ms only), so this is the client's
    wall time around ``RemoteArray.get()`` (one fetch request: device -> pinned arena, the
    host gets a view) and around ``run(identity, x, to_host=True)`` (an invocation, then the
    fetch). The first of each pays for a new arena segment (first touch, cudaHostRegister);
    the GB/s use the best of the later ones."""
    nbytes = cfg.copy_bytes
    host = np.random.default_rng(1).integers(0, 255, size=nbytes, dtype=np.uint8)
    array = session.put(host)
    get_ms, to_host_ms, empty_ms = [], [], []
    identical = True
    for i in range(cfg.copy_reps + 1):
        t = time.perf_counter()
        copy = array.get()
        get_ms.append((time.perf_counter() - t) * 1e3)
        if i == 0:
            identical = identical and _bit_equal(copy, host)
        del copy
    for i in range(cfg.copy_reps + 1):
        t = time.perf_counter()
        copy = session.run(lambda a: a, array, to_host=True)
        to_host_ms.append((time.perf_counter() - t) * 1e3)
        if i == 0:
            identical = identical and _bit_equal(copy, host)
        del copy
    for _ in range(20):  # the same invocation without moving data, for scale
        t = time.perf_counter()
        session.run(lambda a: a.nbytes, array)
        empty_ms.append((time.perf_counter() - t) * 1e3)
    result: dict[str, Any] = {
        "bytes": nbytes,
        "transport": transport(session),
        "clock": "client wall (perf_counter) around the call; includes the request round trip",
        "data_identical": identical,
        "get_first_ms": get_ms[0],
        "get_GBps": _gbps(nbytes, min(get_ms[1:])),
        "get_ms_all": get_ms,
        "to_host_first_ms": to_host_ms[0],
        "to_host_GBps": _gbps(nbytes, min(to_host_ms[1:])),
        "to_host_ms_all": to_host_ms,
        "invocation_without_data_p50_ms": percentile(empty_ms, 50),
    }
    if native:
        copies = native_copy_ms([nbytes], cfg.copy_reps)
        result["native"] = {k: v for k, v in copies.items() if k.startswith(("d2h", "bytes"))}
        result["get_over_pinned"] = copies["d2h_pinned_ms_best"] / min(get_ms[1:])
    else:
        result["native"] = _skipped_native(backend)
    return result


def _file_round_trip(arrays: list[np.ndarray], directory: Path) -> dict[str, Any]:
    """np.save then np.load of ``arrays`` in ``directory``, as the spill and restore do them
    (no fsync: the spill does none), wall time; the files are removed after."""
    directory.mkdir(parents=True)
    t = time.perf_counter()
    for i, array in enumerate(arrays):
        np.save(directory / f"{i}.npy", array, allow_pickle=False)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    loaded = [np.load(directory / f"{i}.npy", allow_pickle=False) for i in range(len(arrays))]
    load_s = time.perf_counter() - t
    same = all(_bit_equal(a, b) for a, b in zip(arrays, loaded, strict=True))
    del loaded
    for i in range(len(arrays)):
        (directory / f"{i}.npy").unlink()
    directory.rmdir()
    return {"np_save_s": save_s, "np_load_s": load_s, "identical": same}


def spill_restore_section(
    broker: BrokerProcess, cfg: SuiteConfig, native: bool, backend: str, scratch: Path
) -> dict[str, Any]:
    """Suspend a session holding ``spill_arrays`` device arrays and bring it back, ``spill_reps``
    times. Spill: client wall of ``Session.suspend()`` (the broker's release with spill: the
    executor copies each array to a fresh host array and ``np.save``s it in the state dir; the
    reply waits for that). Then the used executor is replaced; once the slice is free again
    (so its warm-up is not counted), the first call: client wall of a call that leases again
    with ``restore`` (the new executor ``np.load``s and copies to the device before the grant)
    and runs. ``reacquire_s`` is the Session's own timing of the acquire with restore."""
    broker.wait_for(all_free, timeout=FREE_TIMEOUT)
    rng = np.random.default_rng(4)
    hosts = [
        rng.random(cfg.spill_array_bytes // 4, dtype=np.float32) for _ in range(cfg.spill_arrays)
    ]
    total = sum(h.nbytes for h in hosts)
    cycles = []
    with mig_kernel.connect(broker=broker.connection_file, timeout=FREE_TIMEOUT) as session:
        handles = [session.put(h) for h in hosts]
        session.run(lambda *arrays: len(arrays), *handles)
        used_transport = transport(session)
        for _ in range(cfg.spill_reps):
            lease_before = session.id
            t = time.perf_counter()
            report = session.suspend()
            spill_s = time.perf_counter() - t
            t = time.perf_counter()
            broker.wait_for(all_free, timeout=FREE_TIMEOUT)
            free_s = time.perf_counter() - t
            t = time.perf_counter()
            nbytes = session.run(lambda *arrays: sum(int(a.nbytes) for a in arrays), *handles)
            first_call_s = time.perf_counter() - t
            reacquired = dict(session.reacquired or {})
            identical = True
            for handle, host in zip(handles, hosts, strict=True):
                copy = handle.get()
                identical = identical and _bit_equal(copy, host)
                del copy
            cycles.append(
                {
                    "lease_suspended": lease_before,
                    "lease_restored": session.id,
                    "spill_report": report,
                    "suspend_s": spill_s,
                    "slice_free_again_s": free_s,
                    "first_call_after_s": first_call_s,
                    "reacquire_s": reacquired.get("seconds"),
                    "restored_objects": reacquired.get("restored"),
                    "restore_error": reacquired.get("error"),
                    "bytes_seen_after": nbytes,
                    "bit_identical": identical,
                }
            )
    result: dict[str, Any] = {
        "arrays": cfg.spill_arrays,
        "bytes_each": cfg.spill_array_bytes,
        "bytes": total,
        "clock": "client wall (perf_counter)",
        "transport": used_transport,
        "spill_filesystem": _filesystem(broker.state_dir),
        "cycles": cycles,
        "all_bit_identical": all(c["bit_identical"] for c in cycles),
        "suspend_s_best": min(c["suspend_s"] for c in cycles),
        "first_call_after_s_best": min(c["first_call_after_s"] for c in cycles),
        "host_files": _file_round_trip(hosts, scratch / "spill-file-baseline"),
    }
    if native:
        copies = native_copy_ms([cfg.spill_array_bytes] * cfg.spill_arrays, cfg.copy_reps)
        result["native"] = copies
        for kind in ("d2h_pinned", "d2h_pageable", "d2h_fresh_numpy_wall"):
            result[f"suspend_over_{kind}"] = result["suspend_s_best"] / (
                copies[f"{kind}_ms_best"] / 1e3
            )
        for kind in ("h2d_pinned", "h2d_pageable"):
            result[f"first_call_after_over_{kind}"] = result["first_call_after_s_best"] / (
                copies[f"{kind}_ms_best"] / 1e3
            )
    else:
        result["native"] = _skipped_native(backend)
    return result


def executor_cold_start_section(broker: BrokerProcess, reps: int) -> dict[str, Any]:
    """What a lease costs when its executor is not warm yet. A used lease is released (its
    executor served a tenant, so the broker replaces it) and a lease is requested at once: it
    waits in the queue until the replacement is ready. Measured per rep, client wall from the
    release's reply: until the old executor's pid is gone (polled every 5 ms), until the new
    process started (/proc start time, 10 ms ticks, on CLOCK_BOOTTIME), until the grant, and
    until the first call's answer; the new executor's own warm-up (import, context, first
    kernel) as it logged it. Needs a broker with one slice (the new lease gets the new
    executor)."""
    broker.wait_for(all_free, timeout=FREE_TIMEOUT)
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    cf = broker.connection_file
    slice_id = ""
    rows = []
    session = mig_kernel.connect(broker=cf, timeout=FREE_TIMEOUT)
    try:
        session.run(lambda: 1)  # it has served a tenant now
        for _ in range(reps):
            old_pid = session.executor_pid
            gone: list[float] = []

            def watch(pid: int | None = old_pid, gone: list[float] = gone) -> None:
                while pid is not None and pid_alive(pid):
                    time.sleep(0.005)
                gone.append(time.perf_counter())

            session.release()
            t0 = time.perf_counter()
            boot0 = time.clock_gettime(time.CLOCK_BOOTTIME)
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            session = mig_kernel.connect(broker=cf, timeout=FREE_TIMEOUT)
            t1 = time.perf_counter()
            boot1 = time.clock_gettime(time.CLOCK_BOOTTIME)
            value = session.run(lambda: float((xp.arange(1024, dtype=xp.float32) * 2).sum()))  # noqa: F821
            t2 = time.perf_counter()
            assert value == 1047552.0
            watcher.join(timeout=30)
            slice_id = session.slice["id"]
            pid = session.executor_pid
            ticks = proc_start_ticks(pid) if pid else None
            started = ticks / ticks_per_s if ticks is not None else None
            # The replacement is the slice's latest executor: the last warm-up its log shows.
            warm = [w for w in executor_warm_seconds(broker) if w["slice"] == slice_id]
            rows.append(
                {
                    "new_executor": pid != old_pid,
                    "old_executor_exit_s": gone[0] - t0 if gone else None,
                    "new_process_started_s": started - boot0 if started is not None else None,
                    "release_to_grant_s": t1 - t0,
                    "process_start_to_grant_s": boot1 - started if started is not None else None,
                    "executor_warm_s": warm[-1]["warm_s"] if warm else None,
                    "first_call_ms": (t2 - t1) * 1e3,
                    "release_to_first_answer_s": t2 - t0,
                }
            )
    finally:
        session.close()
    killed = broker.log.read_text(errors="replace").count("(stopping) timed out; killing it")
    return {
        "slice": slice_id,
        "clock": "client wall (perf_counter); process start from /proc (CLOCK_BOOTTIME ticks)",
        "reps": rows,
        "release_to_first_answer_s_best": min(r["release_to_first_answer_s"] for r in rows),
        "process_start_to_grant_s_best": min(
            (r["process_start_to_grant_s"] for r in rows if r["process_start_to_grant_s"]),
            default=None,
        ),
        "executor_warm_s_best": min(
            (r["executor_warm_s"] for r in rows if r["executor_warm_s"] is not None), default=None
        ),
        "broker_log_stopping_executors_killed": killed,
    }


# ------------------------------------------------------------------------------- shared GPU
def shared_gpu_latency(broker: BrokerProcess, n: int, reps: int) -> dict[str, Any]:
    """N sessions on the N `process` slices of one GPU. Each measures the small kernel (client
    wall) while the others hold their slices idle, then all N at once, one thread per session
    (released together by a barrier). The client threads share one Python process: some of
    any increase is the client's GIL, not the GPU."""
    broker.wait_for(all_free, timeout=FREE_TIMEOUT)
    with contextlib.ExitStack() as stack:
        sessions = [
            stack.enter_context(mig_kernel.connect(broker=broker.connection_file, wait=False))
            for _ in range(n)
        ]
        tenants = []
        for session in sessions:
            info = session.ping()
            tenants.append(
                {
                    "slice": session.slice["id"],
                    "profile": session.profile,
                    "isolation": session.isolation,
                    "memory_total": session.memory_total,
                    "memory_limit": info.get("memory_limit"),
                    "pool_limit": (info.get("device") or {}).get("pool_limit"),
                }
            )
        if len({t["slice"] for t in tenants}) != n:
            raise RuntimeError(f"expected {n} distinct slices, got {tenants}")
        solo = [remoted_small_kernel_times(s, reps) for s in sessions]
        concurrent: list[list[float] | None] = [None] * n
        errors: list[str] = []
        barrier = threading.Barrier(n)

        def tenant(i: int) -> None:
            try:
                barrier.wait(timeout=120)
                concurrent[i] = remoted_small_kernel_times(sessions[i], reps)
            except BaseException:
                errors.append(f"tenant {i}: {traceback.format_exc()}")
                barrier.abort()

        threads = [
            threading.Thread(target=tenant, args=(i,), name=f"tenant-{i}", daemon=True)
            for i in range(n)
        ]
        t = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        wall = time.perf_counter() - t
        if any(thread.is_alive() for thread in threads):
            raise RuntimeError("a tenant thread did not finish within 600 s")
        if errors:
            raise RuntimeError("\n".join(errors))
    together = [c for c in concurrent if c is not None]
    pooled_solo = [x for s in solo for x in s]
    pooled_together = [x for c in together for x in c]
    for entry, alone, busy in zip(tenants, solo, together, strict=True):
        entry["others_idle_us"] = _stats(alone)
        entry["all_running_us"] = _stats(busy)
    return {
        "tenants": n,
        "kernel": "a * 2 on 1,024 float32, result kept on the slice (session.run)",
        "clock": "client wall (perf_counter) per call, one thread per session",
        "per_tenant": tenants,
        "others_idle_us": _stats(pooled_solo),
        "all_running_us": _stats(pooled_together),
        "p50_ratio": percentile(pooled_together, 50) / percentile(pooled_solo, 50),
        "p99_ratio": percentile(pooled_together, 99) / percentile(pooled_solo, 99),
        "concurrent_wall_s": wall,
    }


# ------------------------------------------------------------------------------- interference
def _probe_tenant(session: Any, matrix: Any, cfg: SuiteConfig) -> dict[str, Any]:
    """Tenant B's view: the small kernel (client wall), and a medium matmul on ``matrix``
    (client wall, and the executor's compute_ms: the call plus its stream synchronize)."""

    def medium(a: Any) -> None:
        a.dot(a)

    small = remoted_small_kernel_times(session, cfg.interference_reps)
    client, executor = [], []
    for i in range(3 + cfg.medium_reps):
        t = time.perf_counter()
        invocation = session.submit(medium, matrix)
        invocation.result(timeout=300)
        if i >= 3:
            client.append(time.perf_counter() - t)
            executor.append(invocation.timings["compute_ms"] / 1e3)
    return {
        "small_kernel_us": _stats(small),
        "medium_matmul_client_ms": _stats(client, 1e3),
        "medium_matmul_executor_ms": _stats(executor, 1e3),
    }


def _heavy_matmuls() -> Callable[[Any, int], None]:
    """Tenant A's function. Made here, not at module level: cloudpickle sends a nested function
    by value, while a module-level one of an imported ``gpu_suite`` would go by reference and
    the executor cannot import this file."""

    def heavy(a: Any, k: int) -> None:
        for _ in range(k):
            a.dot(a)

    return heavy


class _Hammer:
    """Tenant A: heavy matmul invocations back to back, two in flight so the GPU never waits
    for the client, on a thread until stopped."""

    def __init__(self, session: Any, matrix: Any, per_call: int, n: int) -> None:
        self.session, self.matrix, self.per_call, self.n = session, matrix, per_call, n
        self.stop_event = threading.Event()
        self.running = threading.Event()  # the first call has finished: the GPU is busy
        self.matmuls = 0
        self.error: str | None = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="tenant-a", daemon=True)

    def _run(self) -> None:
        heavy = _heavy_matmuls()
        pending: deque[Any] = deque()
        started = time.perf_counter()
        try:
            while not self.stop_event.is_set():
                pending.append(self.session.submit(heavy, self.matrix, self.per_call))
                if len(pending) >= 2:
                    pending.popleft().result(timeout=300)
                    self.matmuls += self.per_call
                    self.running.set()
            while pending:
                pending.popleft().result(timeout=300)
                self.matmuls += self.per_call
        except BaseException:
            self.error = traceback.format_exc()
        finally:
            self.seconds = time.perf_counter() - started
            self.running.set()

    def __enter__(self) -> _Hammer:
        self.thread.start()
        if not self.running.wait(timeout=300) or self.error:
            self.__exit__()  # __exit__ is not called when __enter__ raises
            raise RuntimeError(f"tenant A did not get going: {self.error or 'no call in 300 s'}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=300)

    def report(self) -> dict[str, Any]:
        if self.thread.is_alive():
            raise RuntimeError("tenant A did not stop within 300 s")
        if self.error:
            raise RuntimeError(f"tenant A failed: {self.error}")
        flops = 2.0 * self.n**3 * self.matmuls
        return {
            "matmuls": self.matmuls,
            "seconds": self.seconds,
            "TFLOP_per_s": flops / self.seconds / 1e12 if self.seconds else None,
        }


def mig_kernel_interference(broker: BrokerProcess, cfg: SuiteConfig) -> dict[str, Any]:
    """Two tenants on two `process` slices of one GPU (needs ``--share 2``)."""
    broker.wait_for(all_free, timeout=FREE_TIMEOUT)
    rng = np.random.default_rng(6)
    cf = broker.connection_file
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(mig_kernel.connect(broker=cf, wait=False))
        b = stack.enter_context(mig_kernel.connect(broker=cf, wait=False))
        if a.slice["id"] == b.slice["id"]:
            raise RuntimeError("both tenants got the same slice")
        heavy_matrix = a.put(rng.random((cfg.heavy_n, cfg.heavy_n), dtype=np.float32))
        medium_matrix = b.put(rng.random((cfg.medium_n, cfg.medium_n), dtype=np.float32))
        a.run(_heavy_matmuls(), heavy_matrix, 1)  # cuBLAS set up in A's executor
        b_alone = _probe_tenant(b, medium_matrix, cfg)
        with _Hammer(a, heavy_matrix, cfg.heavy_per_call, cfg.heavy_n) as hammer:
            time.sleep(cfg.heavy_alone_s)
        a_alone = hammer.report()
        with _Hammer(a, heavy_matrix, cfg.heavy_per_call, cfg.heavy_n) as hammer:
            b_with_a = _probe_tenant(b, medium_matrix, cfg)
            a_ran_throughout = hammer.thread.is_alive() and not hammer.stop_event.is_set()
        a_with_b = hammer.report()
        slices = [a.slice["id"], b.slice["id"]]
    return {
        "slices": slices,
        "workloads": (
            f"A: {cfg.heavy_per_call} x {cfg.heavy_n}^2 float32 matmul per call, two calls in "
            f"flight; B: a * 2 on 1,024 floats ({cfg.interference_reps} calls) and a "
            f"{cfg.medium_n}^2 float32 matmul ({cfg.medium_reps} calls)"
        ),
        "b_alone": b_alone,
        "b_with_a": b_with_a,
        "a_alone": a_alone,
        "a_with_b": a_with_b,
        "a_ran_throughout": a_ran_throughout,
        "ratios": _ratios(b_alone, b_with_a),
    }


def _ratios(alone: dict[str, Any], busy: dict[str, Any]) -> dict[str, float]:
    """B with A over B alone, per measure and percentile."""
    out = {}
    for measure in ("small_kernel_us", "medium_matmul_client_ms", "medium_matmul_executor_ms"):
        if measure in alone and measure in busy:
            for q in ("p50", "p99"):
                out[f"{measure}_{q}"] = busy[measure][q] / alone[measure][q]
    return out


# Native tenants: plain processes running this file with --worker.
def _synchronizer(xp: Any) -> Callable[[], None]:
    if xp.__name__ == "cupy":
        return xp.cuda.Device().synchronize
    return lambda: None


def _worker_heavy(spec: dict[str, Any]) -> dict[str, Any]:
    """Native tenant A: matmuls back to back (a synchronize every ``per_sync``) until the stop
    file appears or ``max_s`` passes."""
    xp = importlib.import_module(spec["xp"])
    sync = _synchronizer(xp)
    n, per_sync = int(spec["n"]), int(spec["per_sync"])
    a = xp.asarray(np.random.default_rng(7).random((n, n), dtype=np.float32))
    a.dot(a)
    sync()
    Path(spec["ready_file"]).touch()
    stop_file = Path(spec["stop_file"])
    matmuls = 0
    started = time.perf_counter()
    while not stop_file.exists() and time.perf_counter() - started < float(spec["max_s"]):
        for _ in range(per_sync):
            a.dot(a)
        sync()
        matmuls += per_sync
    seconds = time.perf_counter() - started
    return {
        "matmuls": matmuls,
        "seconds": seconds,
        "TFLOP_per_s": 2.0 * n**3 * matmuls / seconds / 1e12,
        "stopped_by": "stop file" if stop_file.exists() else "max_s",
    }


def _worker_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Native tenant B: the small kernel (gpu_dataplane's in-process loop on CuPy) and a medium
    matmul, each synchronized, wall time in this process."""
    xp = importlib.import_module(spec["xp"])
    sync = _synchronizer(xp)
    reps, m = int(spec["reps"]), int(spec["medium_n"])
    if xp.__name__ == "cupy":
        small = native_small_kernel_times(reps)
    else:  # sim: NumPy stands in, so the orchestration runs on a CPU machine
        x = np.ones(1024, dtype=np.float32)
        small = []
        for i in range(reps + 50):
            t = time.perf_counter()
            y = x * 2
            if i >= 50:
                small.append(time.perf_counter() - t)
        del y
    b = xp.asarray(np.random.default_rng(8).random((m, m), dtype=np.float32))
    medium = []
    for i in range(3 + int(spec["medium_reps"])):
        t = time.perf_counter()
        b.dot(b)
        sync()
        if i >= 3:
            medium.append(time.perf_counter() - t)
    return {"small_kernel_us": _stats(small), "medium_matmul_ms": _stats(medium, 1e3)}


def _worker_command(spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]


def _worker_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited {proc.returncode}: {err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.Popen(
        _worker_command(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        return _worker_result(proc, timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def _heavy_process(spec: dict[str, Any], work: Path) -> Iterator[dict[str, Any]]:
    """Start native tenant A, wait until its first matmul is done, yield; then stop it and put
    its report into the yielded dict (``ran_throughout``: it was still running at the end)."""
    ready, stop = work / f"ready-{time.monotonic_ns()}", work / f"stop-{time.monotonic_ns()}"
    spec = {**spec, "ready_file": str(ready), "stop_file": str(stop)}
    proc = subprocess.Popen(
        _worker_command(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    report: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            if proc.poll() is not None:
                _, err = proc.communicate()
                raise RuntimeError(f"heavy worker exited {proc.returncode}: {err[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("heavy worker not ready within 300 s")
            time.sleep(0.05)
        yield report
        report["ran_throughout"] = proc.poll() is None
        stop.touch()
        report.update(_worker_result(proc, timeout=120))
    finally:
        stop.touch()
        if proc.poll() is None:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def native_interference(cfg: SuiteConfig, backend: str, work: Path) -> dict[str, Any]:
    """The same two workloads as two plain processes (CuPy on a GPU; NumPy on sim, so only the
    orchestration is tested there): B alone, A alone for ``heavy_alone_s``, B while A runs."""
    xp = "cupy" if backend == "nvml" else "numpy"
    work.mkdir(parents=True, exist_ok=True)
    probe = {
        "role": "probe",
        "xp": xp,
        "reps": cfg.interference_reps,
        "medium_n": cfg.medium_n,
        "medium_reps": cfg.medium_reps,
    }
    heavy = {
        "role": "heavy",
        "xp": xp,
        "n": cfg.heavy_n,
        "per_sync": cfg.heavy_per_call,
        "max_s": cfg.heavy_max_s,
    }
    b_alone = _run_probe(probe)
    with _heavy_process(heavy, work) as a_alone:
        time.sleep(cfg.heavy_alone_s)
    with _heavy_process(heavy, work) as a_with_b:
        b_with_a = _run_probe(probe)
    result: dict[str, Any] = {
        "runtime": xp if xp == "cupy" else "numpy (sim backend: no GPU, code path only)",
        "clock": "wall (perf_counter) in B's process, each kernel synchronized",
        "b_alone": b_alone,
        "b_with_a": b_with_a,
        "a_alone": a_alone,
        "a_with_b": a_with_b,
    }
    ratios = {}
    for measure in ("small_kernel_us", "medium_matmul_ms"):
        for q in ("p50", "p99"):
            ratios[f"{measure}_{q}"] = b_with_a[measure][q] / b_alone[measure][q]
    result["ratios"] = ratios
    return result


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    role = spec["role"]
    if role == "heavy":
        result = _worker_heavy(spec)
    elif role == "probe":
        result = _worker_probe(spec)
    else:
        raise ValueError(f"unknown worker role {role!r}")
    print(json.dumps(result, default=_jsonable), flush=True)
    return 0


# ------------------------------------------------------------------------------- the run
class _Recorder:
    """Runs sections fail-soft, prints progress, and rewrites the results file after each."""

    def __init__(self, results: dict[str, Any], out: Path | None) -> None:
        self.results = results
        self.out = out
        self.seconds: dict[str, float] = results.setdefault("section_seconds", {})

    def section(self, where: dict[str, Any], name: str, label: str, fn: Callable[[], Any]) -> Any:
        print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
        t = time.perf_counter()
        try:
            value = fn()
        except Exception:
            error = traceback.format_exc()
            print(f"  {label} FAILED:\n{error}", flush=True)
            partial = where.get(name)  # a group keeps what its finished subsections recorded
            value = {**partial, "error": error} if isinstance(partial, dict) else {"error": error}
        else:
            print(f"  {label}: {_brief(value)}", flush=True)
        where[name] = value
        self.seconds[label] = round(time.perf_counter() - t, 2)
        self.save()
        return value

    def save(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(self.results, indent=1, default=_jsonable))
        partial.replace(self.out)


def _has_error(value: Any) -> bool:
    if isinstance(value, dict):
        return "error" in value or any(_has_error(v) for v in value.values())
    return False


def run_gpu_suite(
    *,
    backend: str = "nvml",
    reps: int | None = None,
    quick: bool = False,
    shares: tuple[int, ...] | None = None,
    only: Collection[str] | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Run the sections (``only``: a subset of SECTIONS, or ``whole_gpu`` for its seven) and
    return the results as one JSON-able dict; ``out`` is rewritten after every section.
    ``reps``: small-kernel calls per measurement (default 500, quick 50)."""
    if backend not in ("nvml", "sim"):
        raise ValueError(f"unknown backend {backend!r}: expected nvml or sim")
    overrides: dict[str, Any] = {}
    if reps is not None:
        overrides["reps"] = reps
    if shares is not None:
        overrides["shares"] = tuple(shares)
    cfg = SuiteConfig.quick(**overrides) if quick else SuiteConfig(**overrides)
    wanted = set(SECTIONS) if not only else set(only)
    if "whole_gpu" in wanted:
        wanted |= set(WHOLE_GPU)
    unknown = wanted - set(SECTIONS) - {"whole_gpu"}
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    native = backend == "nvml"
    results: dict[str, Any] = {
        "suite": "benchmarks/gpu_suite.py",
        "backend": backend,
        "quick": quick,
        "config": asdict(cfg),
        "machine": machine(),
        "notes": [
            INTERFERENCE_NOTE,
            "Clocks: client wall = time.perf_counter in the benchmark process; events = CUDA "
            "events around the copies; executor compute_ms = the executor's wall time around "
            "the function and its stream synchronize.",
            "shared_gpu runs its tenants as threads of one client process: part of any "
            "latency increase there can be the client's GIL; interference_* has one tenant "
            "measuring at a time.",
        ],
    }
    if backend == "sim":
        results["notes"].append(
            "sim backend: NumPy executors and host copies; the numbers test code paths only."
        )
    rec = _Recorder(results, out)
    started = time.perf_counter()
    if native:
        rec.section(results, "gpu", "nvidia-smi", nvidia_smi)
    else:
        results["gpu"] = {"skipped": "sim backend: no GPU"}
    with tempfile.TemporaryDirectory(prefix="mig-gpu-suite-") as tmp_name:
        tmp = Path(tmp_name)
        if "native_cold_start" in wanted:
            if native:
                rec.section(results, "native_cold_start", "native cold start", native_cold_start)
            else:
                results["native_cold_start"] = _skipped_native(backend)
        if native:
            rec.section(results, "cupy", "cupy in-process", cupy_info)
        if wanted & set(WHOLE_GPU):
            whole: dict[str, Any] = {}
            results["whole_gpu"] = whole
            rec.section(
                results,
                "whole_gpu",
                "whole GPU",
                lambda: _whole_gpu(rec, whole, tmp, backend, cfg, wanted),
            )
        if "shared_gpu" in wanted:
            shared: dict[str, Any] = {}
            results["shared_gpu"] = shared
            for n in cfg.shares:
                rec.section(
                    shared,
                    f"share_{n}",
                    f"shared GPU, {n} executors",
                    lambda n=n: _shared_gpu(tmp, backend, n, cfg.reps),
                )
        if wanted & {"interference_mig_kernel", "interference_native"}:
            interference: dict[str, Any] = {"note": INTERFERENCE_NOTE}
            results["interference"] = interference
            if "interference_mig_kernel" in wanted:
                rec.section(
                    interference,
                    "mig_kernel_process",
                    "interference, mig-kernel process slices",
                    lambda: _interference_group(tmp, backend, cfg),
                )
            if "interference_native" in wanted:
                rec.section(
                    interference,
                    "native_processes",
                    "interference, native processes",
                    lambda: native_interference(cfg, backend, tmp / "native-interference"),
                )
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["errors"] = _has_error({k: v for k, v in results.items() if k != "notes"})
    rec.save()
    return results


def _whole_gpu(
    rec: _Recorder,
    whole: dict[str, Any],
    tmp: Path,
    backend: str,
    cfg: SuiteConfig,
    wanted: set[str],
) -> dict[str, Any]:
    """One broker, one slice: the whole GPU; each section on its own fresh lease."""
    native = backend == "nvml"

    def first_call(broker: BrokerProcess) -> dict[str, float]:
        broker.wait_for(all_free, timeout=FREE_TIMEOUT)
        return warm_first_call(broker)

    steps: list[tuple[str, Callable[[BrokerProcess], Any]]] = [
        ("warm_first_call", first_call),
        (
            "small_kernel",
            lambda br: with_session(
                br, lambda s: small_kernel_section(s, cfg.reps, native, backend)
            ),
        ),
        (
            "call_breakdown",
            lambda br: with_session(br, lambda s: call_breakdown_section(s, cfg.reps)),
        ),
        ("h2d", lambda br: with_session(br, lambda s: h2d_section(s, cfg, native, backend))),
        ("d2h", lambda br: with_session(br, lambda s: d2h_section(s, cfg, native, backend))),
        (
            "pipelining",
            lambda br: with_session(
                br, lambda s: pipelining(s, cfg.pipeline_count, cfg.pipeline_bytes)
            ),
        ),
        ("spill_restore", lambda br: spill_restore_section(br, cfg, native, backend, tmp)),
        ("executor_cold_start", lambda br: executor_cold_start_section(br, cfg.cold_reps)),
    ]
    with running_broker(tmp, "whole", backend, share=1, per_user_limit=1) as broker:
        whole["slices"] = broker.status()["slices"]
        for name, step in steps:
            if name in wanted:
                rec.section(whole, name, f"whole GPU: {name}", lambda step=step: step(broker))
        whole["executor_warm_from_logs"] = executor_warm_seconds(broker)
        if _has_error(whole):
            whole["logs"] = log_tails(broker)
    return whole


def _keeping_logs(broker: BrokerProcess, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or its traceback with the broker's and executors' log tails (read before the
    temporary state dir goes)."""
    try:
        result = fn()
    except Exception:
        return {"error": traceback.format_exc(), "logs": log_tails(broker)}
    result["executor_warm_from_logs"] = executor_warm_seconds(broker)
    return result


def _shared_gpu(tmp: Path, backend: str, n: int, reps: int) -> dict[str, Any]:
    with running_broker(tmp, f"share{n}", backend, share=n, per_user_limit=n) as broker:
        return _keeping_logs(broker, lambda: shared_gpu_latency(broker, n, reps))


def _interference_group(tmp: Path, backend: str, cfg: SuiteConfig) -> dict[str, Any]:
    with running_broker(tmp, "interference", backend, share=2, per_user_limit=2) as broker:
        return _keeping_logs(broker, lambda: mig_kernel_interference(broker, cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["nvml", "sim"], default="nvml")
    parser.add_argument("--quick", action="store_true", help="small sizes and counts (smoke test)")
    parser.add_argument("--reps", type=int, help="small-kernel calls per measurement")
    parser.add_argument("--shares", default=None, help="executors sharing the GPU, e.g. 2,4")
    parser.add_argument(
        "--only", default="", help=f"comma-separated sections: whole_gpu, {', '.join(SECTIONS)}"
    )
    parser.add_argument("--out", default=None, help="results JSON (rewritten after each section)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a native tenant process
    args = parser.parse_args()
    if args.worker:
        sys.exit(worker_main(args.worker))
    out = Path(args.out or f"benchmarks/results/gpu-suite-{args.backend}.json")
    shares = tuple(int(x) for x in args.shares.split(",")) if args.shares else None
    only = [x.strip() for x in args.only.split(",") if x.strip()] or None
    results = run_gpu_suite(
        backend=args.backend, reps=args.reps, quick=args.quick, shares=shares, only=only, out=out
    )
    status = "with errors (see the 'error' entries)" if results["errors"] else "without errors"
    print(f"done in {results['total_seconds']} s {status}; results in {out}", flush=True)


if __name__ == "__main__":
    main()
