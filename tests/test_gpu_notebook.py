"""Notebook integration on a real NVIDIA GPU: mig-kernel kernels against an ``nvml`` broker
(two memory-capped ``process`` slices per GPU when MIG is off). The kernel process must not
see the GPU while its ``%%gpufunc`` cells run on it; the demos run end to end with CuPy."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mig_kernel.testing import BrokerProcess, all_free
from tests.support.kernels import Kernels
from tests.support.notebooks import execute
from tests.test_gpu import REASON, record

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]


@pytest.fixture
def gpu_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(
        tmp_path / "state", ["--backend", "nvml", "--share", "2", "--per-user-limit", "2"]
    )
    broker.start()
    try:
        broker.wait_for(all_free, timeout=180)
        monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
        yield broker
    finally:
        broker.stop()


def test_kernel_sees_no_gpu_while_its_cells_run_on_one(
    gpu_node: BrokerProcess, tmp_path: Path
) -> None:
    kernels = Kernels(tmp_path / "kernels")
    try:
        kernel = kernels.start(kernels.spec("mig-any"), env={"CUDA_VISIBLE_DEVICES": "0"})
        local = kernel.run(
            "import os, cupy\n"
            "print(repr(os.environ['CUDA_VISIBLE_DEVICES']))\n"
            "try:\n"
            "    print(cupy.cuda.runtime.getDeviceCount())\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n"
        )
        remote = kernel.run(
            "%%gpufunc\nimport os\n"
            "print(xp.__name__, xp.cuda.runtime.getDeviceCount(), "
            "os.environ['CUDA_VISIBLE_DEVICES'][:4])\n"
        )
        record("kernel-gpu-visibility.json", {"kernel": local.stdout, "slice": remote.stdout})
        lines = local.stdout.splitlines()
        assert lines[0] == "''"
        assert lines[1].startswith("CUDARuntimeError") and "no CUDA-capable device" in lines[1]
        assert remote.stdout == "cupy 1 GPU-\n", remote.traceback
    finally:
        kernels.stop_all()


def test_demos_run_on_the_gpu(
    gpu_node: BrokerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick = execute("quickstart.ipynb", tmp_path / "q", monkeypatch)
    cnn = execute("cnn_inference.ipynb", tmp_path / "c", monkeypatch)
    record("demos-gpu.json", {"quickstart": quick, "cnn_inference": cnn})
    assert "isolation  process" in quick["status"]
    assert quick["fft"] == "FFT of 4096 points with cupy on the slice\n"
    assert abs(float(quick["display"]) - 146119.4154) < 1e-2
    assert re.match(r"mig-kernel: slice re-acquired in [0-9.]+ s", quick["reacquire"])
    assert quick["done"] == "QUICKSTART OK\n"
    assert re.search(r"256 images x 10 passes on cupy: [\d,]+ images/s", cnn["timed"])
    assert "[0, 21, 0, 20, 35, 0, 0, 3, 177, 0]" in cnn["to-host-check"]
    assert cnn["done"] == "CNN OK 1280 images\n"
