"""Executing the demo notebooks with nbclient in a mig-python3 kernel (kernelspec written into
a temporary Jupyter data dir; the broker comes from ``MIG_KERNEL_BROKER``)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from mig_kernel.jupyter.kernelspec import kernel_json

DEMOS = Path(__file__).resolve().parents[2] / "demos"


def execute(notebook: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Run a demo end to end; returns cell id -> its text output (streams and results)."""
    data_dir = tmp_path / "jupyter"
    spec_dir = data_dir / "kernels" / "mig-python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json(None, "Python 3 (MIG slice)")))
    monkeypatch.setenv("JUPYTER_PATH", str(data_dir))
    nb = nbformat.read(DEMOS / notebook, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="mig-python3", resources={}).execute()
    out: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        text = ""
        for output in cell.outputs:
            if output.output_type == "stream":
                text += output.text
            elif output.output_type in ("execute_result", "display_data"):
                text += output.data.get("text/plain", "") + "\n"
        out[cell.id] = text
    return out
