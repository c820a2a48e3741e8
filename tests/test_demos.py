"""The demo notebooks, executed end to end with nbclient in a mig-python3 kernel against a real
(simulated) broker; the outputs of the cells tagged ``mig-check`` are checked."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from mig_kernel.testing import BrokerProcess
from tests.support.notebooks import execute


def test_quickstart(
    make_broker: Callable[..., BrokerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker()
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    out = execute("quickstart.ipynb", tmp_path, monkeypatch)
    assert "profile    1g.10gb" in out["status"] and "isolation  sim" in out["status"]
    assert out["fft"] == "FFT of 4096 points with numpy on the slice\n"
    assert "RemoteArray (4096,) float64" in out["fft-check"]
    assert "correlation matrix matches NumPy" in out["decorator"]
    assert abs(float(out["display"]) - 146119.415422336) < 1e-3
    [line] = out["reacquire"].splitlines()
    assert re.fullmatch(
        r"mig-kernel: slice re-acquired in [0-9.]+ s \(1g\.10gb on gpu0-s\d\); "
        r"3 device objects restored",
        line,
    ), line
    assert "nothing lost" in out["reacquire-check"]
    first_lease = re.search(r"lease +(L-\w+)", out["status"])
    last_lease = re.search(r"lease +(L-\w+)", out["status-end"])
    assert first_lease and last_lease and first_lease[1] != last_lease[1]
    assert out["done"] == "QUICKSTART OK\n"
    broker.wait_for(lambda s: all(x["lease"] is None for x in s["slices"]))  # kernel gone


def test_cnn_inference(
    make_broker: Callable[..., BrokerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker()
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    out = execute("cnn_inference.ipynb", tmp_path, monkeypatch)
    assert out["upload"] == "5258 parameters on the slice\n"
    assert "(8, 1, 3, 3) (16, 8, 3, 3) (400, 10)" in out["upload-check"]
    assert re.search(r"256 images x 10 passes on numpy: [\d,]+ images/s", out["timed"])
    assert "ndarray (256, 10) float32" in out["to-host-check"]
    assert "[0, 21, 0, 20, 35, 0, 0, 3, 177, 0]" in out["to-host-check"]
    assert "slice and host agree on 256 images" in out["reference"]
    assert "same classes as the host" in out["stream"]
    assert out["done"] == "CNN OK 1280 images\n"
