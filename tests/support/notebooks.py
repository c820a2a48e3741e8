"""Executing notebooks with nbclient in a mig-python3 kernel (kernelspec written into a
temporary Jupyter data dir; the broker comes from ``MIG_KERNEL_BROKER``): the demo notebooks,
and notebooks a test writes cell by cell."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from mig_kernel.jupyter.kernelspec import kernel_json

DEMOS = Path(__file__).resolve().parents[2] / "demos"
KERNEL = "mig-python3"
RAISES = "raises-exception"  # nbclient's tag: the cell is expected to fail, the run goes on


def use_kernelspec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Write the mig-python3 kernelspec into a Jupyter path of the test's own; its name."""
    data_dir = tmp_path / "jupyter"
    spec_dir = data_dir / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json(None, "GPU slice (any)")))
    monkeypatch.setenv("JUPYTER_PATH", str(data_dir))
    return KERNEL


def text_of(outputs: list[nbformat.NotebookNode]) -> str:
    """A cell's streams and the text/plain of its results and displays."""
    text = ""
    for output in outputs:
        if output.output_type == "stream":
            text += output.text
        elif output.output_type in ("execute_result", "display_data"):
            text += output.data.get("text/plain", "") + "\n"
    return text


def execute(notebook: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Run a demo end to end; returns cell id -> its text output (streams and results)."""
    kernel = use_kernelspec(tmp_path, monkeypatch)
    nb = nbformat.read(DEMOS / notebook, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name=kernel, resources={}).execute()
    return {cell.id: text_of(cell.outputs) for cell in nb.cells if cell.cell_type == "code"}


def run_cells(
    cells: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, fails: tuple = ()
) -> dict[str, list[nbformat.NotebookNode]]:
    """A notebook of ``cells`` (id -> source, in order) run top to bottom in a mig-python3
    kernel; returns id -> the cell's outputs. Cells named in ``fails`` are expected to raise
    (the run goes on); any other error fails the test with nbclient's CellExecutionError."""
    kernel = use_kernelspec(tmp_path, monkeypatch)
    nb = new_notebook()
    for cell_id, source in cells.items():
        cell = new_code_cell(source=source, id=cell_id)
        if cell_id in fails:
            cell.metadata["tags"] = [RAISES]
        nb.cells.append(cell)
    NotebookClient(nb, timeout=180, kernel_name=kernel, resources={}).execute()
    return {cell.id: cell.outputs for cell in nb.cells}
