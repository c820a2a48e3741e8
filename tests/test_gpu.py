"""On a real NVIDIA GPU: read-only NVML discovery, and the broker leasing `process` slices whose
executors warm up CuPy (several executors sharing one GPU). MIG instances are never created
here: MIG creation is tested against tests/fakes/fake_pynvml.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import mig_kernel


def _gpu_reason() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception as exc:
        return f"no NVIDIA driver/GPU here (NVML: {type(exc).__name__})"
    if count == 0:
        return "NVML finds no GPU"
    try:
        import cupy

        if not cupy.cuda.is_available():
            return "CuPy finds no CUDA device"
    except ImportError:
        return "CuPy is not installed"
    return None


REASON = _gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]
RECORD = os.environ.get("MIG_KERNEL_GPU_RECORD")  # a directory to write what was seen


def record(name: str, data: object) -> None:
    if RECORD:
        Path(RECORD).mkdir(parents=True, exist_ok=True)
        (Path(RECORD) / name).write_text(json.dumps(data, indent=1, default=str))


def test_nvml_discovery_is_read_only_and_honest_about_isolation() -> None:
    from mig_kernel.slices import make_inventory

    inventory = make_inventory("nvml")
    try:
        gpus = [g.to_json() for g in inventory.gpus()]
        slices = [s.to_json() for s in inventory.slices()]
        shared = make_inventory("nvml", share=2)
        shared_slices = [s.to_json() for s in shared.slices()]
        shared.close()
    finally:
        inventory.close()
    record("nvml-discovery.json", {"gpus": gpus, "slices": slices, "share2": shared_slices})
    assert gpus and slices
    for gpu, entry in zip(gpus, slices, strict=False):
        if not gpu["mig_enabled"]:
            assert entry["isolation"] == "process" and entry["uuid"].startswith("GPU-")
            assert entry["env"]["CUDA_VISIBLE_DEVICES"] == gpu["uuid"]
        else:
            assert entry["isolation"] == "mig" and entry["uuid"].startswith("MIG-")
    assert len(shared_slices) == 2 * len([g for g in gpus if not g["mig_enabled"]]) or any(
        g["mig_enabled"] for g in gpus
    )


def test_two_executors_share_one_gpu_in_process_isolation(tmp_path: Path) -> None:
    from mig_kernel.testing import BrokerProcess, all_free

    broker = BrokerProcess(
        tmp_path / "state", ["--backend", "nvml", "--share", "2", "--per-user-limit", "2"]
    )
    broker.start()
    try:
        status = broker.wait_for(all_free, timeout=180)
        record("broker-status-share2.json", status)
        assert len(status["slices"]) >= 2
        assert {s["isolation"] for s in status["slices"]} == {"process"}
        first = mig_kernel.connect(broker=broker.connection_file)
        second = mig_kernel.connect(broker=broker.connection_file)
        try:
            pings = [first.ping(), second.ping()]
            record("executor-pings.json", pings)
            assert pings[0]["pid"] != pings[1]["pid"]
            for session, info in zip((first, second), pings, strict=True):
                assert info["runtime"] == "cupy" and info["warm_seconds"] > 0
                assert info["device"]["pool_limit"] == session.memory_total  # the cap is set
                assert info["cuda_visible_devices"].startswith("GPU-")
            assert first.slice["id"] != second.slice["id"]
        finally:
            first.release()
            second.release()
    finally:
        broker.stop()
