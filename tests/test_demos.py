"""The demo notebooks, executed end to end with nbclient in a mig-python3 kernel against a real
(simulated) broker; the outputs of the cells tagged ``mig-check`` are checked. And run by
papermill with other values for their ``parameters`` cell, which the rest must honour."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest

from mig_kernel.testing import BrokerProcess
from tests.support.notebooks import DEMOS, execute, text_of, use_kernelspec


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


@pytest.mark.parametrize(
    ("notebook", "parameters", "expected"),
    [
        (
            "quickstart.ipynb",
            {"N_POINTS": 1024, "SEED": 1},
            {"fft": "FFT of 1024 points with numpy on the slice\n", "done": "QUICKSTART OK\n"},
        ),
        (
            "cnn_inference.ipynb",
            {"N_IMAGES": 64, "REPS": 2, "STREAM_CHUNKS": 2},
            {"upload": "5258 parameters on the slice\n", "done": "CNN OK 192 images\n"},
        ),
    ],
    ids=["quickstart", "cnn_inference"],
)
def test_papermill_parameters_are_honoured(
    make_broker: Callable[..., BrokerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    notebook: str,
    parameters: dict[str, int],
    expected: dict[str, str],
) -> None:
    """papermill injects its values after the cell tagged ``parameters``, and every later cell
    reads them (the demos' cells hold no second copy of a parameter)."""
    papermill = pytest.importorskip("papermill", reason="papermill is not installed")
    broker = make_broker()
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    kernel = use_kernelspec(tmp_path, monkeypatch)
    out = tmp_path / notebook
    papermill.execute_notebook(
        str(DEMOS / notebook),
        str(out),
        parameters=parameters,
        kernel_name=kernel,
        cwd=str(tmp_path),
        progress_bar=False,
    )
    nb = nbformat.read(out, as_version=4)
    tags = [cell.metadata.get("tags", []) for cell in nb.cells]
    at = next(i for i, t in enumerate(tags) if "parameters" in t)
    assert "injected-parameters" in tags[at + 1]
    text = {cell.id: text_of(cell.outputs) for cell in nb.cells if cell.cell_type == "code"}
    for cell_id, value in expected.items():
        assert text[cell_id] == value, (cell_id, text[cell_id])
    if notebook == "cnn_inference.ipynb":
        assert re.search(r"64 images x 2 passes on numpy", text["timed"])
        assert "(64, 10) float32" in text["to-host-check"]
