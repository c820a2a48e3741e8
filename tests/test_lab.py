"""``mig-kernel lab`` as a user runs it: a real broker, a real JupyterLab, a real SIGTERM."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from mig_kernel.jupyter.lab import LabOptions, demos_root, jupyterlab_argv, labextension_path
from mig_kernel.procs import pid_alive
from mig_kernel.testing import all_free, executor_pids, run_cli, wait_until
from tests.support.lab import Lab

LAYOUT = "H100-80GB:3g.40gb,1g.10gb"


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(*args: str, state_dir: Path | None = None) -> Lab:
        root = tmp_path / f"lab{len(labs)}"
        root.mkdir()
        lab = Lab(root, state_dir or root / "state", list(args))
        labs.append(lab)
        return lab.start()

    yield make
    for lab in labs:
        lab.kill()


def notebooks(tmp_path: Path) -> Path:
    root = tmp_path / "notebooks"
    root.mkdir()
    nbformat.write(nbformat.v4.new_notebook(), root / "quickstart.ipynb")
    return root


def free_status(connection_file: Path) -> dict[str, Any] | None:
    """``mig-kernel status --json``, once every slice is free (the warm pool is up)."""
    result = run_cli("status", "--json", env={"MIG_KERNEL_BROKER": str(connection_file)})
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    return status if all_free(status) else None


@pytest.mark.slow
def test_lab_runs_broker_and_jupyterlab_and_stops_both(make_lab, tmp_path: Path) -> None:
    root = notebooks(tmp_path)
    lab = make_lab("--backend", "sim", "--sim-layout", LAYOUT, "--root-dir", str(root))
    assert "started" in lab.wait_ready()

    specs = lab.get("/api/kernelspecs")["kernelspecs"]
    ours = {name: entry["spec"] for name, entry in specs.items() if name.startswith("mig-")}
    assert {name: spec["display_name"] for name, spec in ours.items()} == {
        "mig-python3": "GPU slice (any, simulated)",
        "mig-python3-1g.10gb": "GPU slice 1g.10gb (simulated)",
        "mig-python3-3g.40gb": "GPU slice 3g.40gb (simulated)",
    }
    provisioner = ours["mig-python3-3g.40gb"]["metadata"]["kernel_provisioner"]
    assert provisioner == {
        "provisioner_name": "mig-provisioner",
        "config": {"profile": "3g.40gb", "acquire": "eager"},
    }
    assert [item["name"] for item in lab.get("/api/contents")["content"]] == ["quickstart.ipynb"]
    assert "you may hold all 2 slice(s) at once, one per notebook" in lab.log()

    connection_file = lab.state_dir / "broker.json"
    status = wait_until(lambda: free_status(connection_file), 30, "every slice free")
    assert sorted((s["profile"], s["isolation"]) for s in status["slices"]) == [
        ("1g.10gb", "sim"),
        ("3g.40gb", "sim"),
    ]
    executors = list(executor_pids(lab.state_dir).values())
    assert len(executors) == 2 and all(pid_alive(pid) for pid in executors)
    jupyterlab = lab.jupyterlab_pid()

    assert lab.terminate() == 0, lab.log()

    assert not connection_file.exists()
    assert not pid_alive(jupyterlab)
    wait_until(lambda: not any(pid_alive(pid) for pid in executors), 10, "executors gone")
    log = lab.log()
    steps = [
        "mig-kernel lab: SIGTERM: stopping",
        "mig-kernel lab: JupyterLab stopped",
        "mig-kernel lab: stopping the broker",
        "mig-kernel lab: the broker stopped (exit code 0)",
    ]
    positions = [log.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), log


@pytest.mark.slow
def test_lab_uses_a_running_broker_and_leaves_it_running(
    make_broker, make_lab, tmp_path: Path
) -> None:
    broker = make_broker(layout="H100-80GB:2g.20gb,1g.10gb")
    lab = make_lab("--root-dir", str(notebooks(tmp_path)), state_dir=broker.state_dir)
    lab.wait_ready()
    specs = lab.get("/api/kernelspecs")["kernelspecs"]
    assert sorted(name for name in specs if name.startswith("mig-")) == [
        "mig-python3",
        "mig-python3-1g.10gb",
        "mig-python3-2g.20gb",
    ]
    assert "using the broker already running" in lab.log()

    assert lab.terminate() == 0, lab.log()

    assert broker.proc is not None and broker.proc.poll() is None
    assert broker.connection_file.exists()
    assert all_free(broker.status())
    assert "stopping the broker" not in lab.log()


@pytest.mark.slow
def test_stopping_lab_releases_kernel_slices_before_the_broker_stops(
    make_lab, tmp_path: Path
) -> None:
    lab = make_lab(
        "--backend", "sim", "--sim-layout", "H100-80GB:2x1g.10gb", "--root-dir", str(tmp_path)
    )
    lab.wait_ready()
    kernel = lab.call("POST", "/api/kernels", {"name": "mig-python3-1g.10gb"}, timeout=60)
    connection_file = lab.state_dir / "broker.json"

    def leased() -> list[dict[str, Any]]:
        result = run_cli("status", "--json", env={"MIG_KERNEL_BROKER": str(connection_file)})
        return [s for s in json.loads(result.stdout)["slices"] if s["state"] == "leased"]

    assert len(wait_until(leased, 30, f"kernel {kernel['id']} holding a slice")) == 1

    assert lab.terminate() == 0, lab.log()

    db = sqlite3.connect(str(lab.state_dir / "broker.sqlite"))
    try:
        ends = db.execute("SELECT end_reason FROM leases").fetchall()
    finally:
        db.close()
    assert ends == [("released",)], lab.log()  # by the provisioner, not "broker_stopped"


def test_lab_fails_with_the_brokers_reason(tmp_path: Path) -> None:
    result = run_cli(
        "lab",
        "--backend",
        "sim",
        "--sim-layout",
        "H100-80GB:3x3g.40gb",
        "--state-dir",
        str(tmp_path / "state"),
        "--no-browser",
        "--kernelspec-prefix",
        str(tmp_path / "prefix"),
    )
    assert result.returncode == 2, result.stderr
    assert "the broker exited with exit code 2" in result.stderr
    assert "3g.40gb" in result.stderr  # the broker's own reason, from its output
    assert "starting JupyterLab" not in result.stderr
    assert not (tmp_path / "prefix").exists()


def test_demos_root_is_a_copy_outside_the_checkout(tmp_path: Path) -> None:
    """JupyterLab opens a copy in the home directory: the checkout's demos/ (else the packaged
    ones), display names as installed; a demo the user changed is kept, an untouched copy
    follows the demos."""
    package = tmp_path / "checkout" / "mig_kernel"
    (package / "demos").mkdir(parents=True)  # packaged copy: ignored in a checkout
    demos = tmp_path / "checkout" / "demos"
    demos.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "mig-python3", "display_name": "old name"}
    nbformat.write(notebook, demos / "quickstart.ipynb")
    (demos / "README.md").write_text("read me")
    (demos / "build_demos.py").write_text("")  # not a demo
    home = tmp_path / "home"
    home.mkdir()
    names = {"mig-python3": "GPU slice (any, simulated)"}
    copy = demos_root(package, home, names)
    assert copy == home / "mig-kernel-demos"
    assert sorted(p.name for p in copy.iterdir()) == [
        ".mig-kernel-demos.json",
        "README.md",
        "quickstart.ipynb",
    ]
    spec = nbformat.read(copy / "quickstart.ipynb", 4).metadata["kernelspec"]
    assert spec["display_name"] == "GPU slice (any, simulated)"
    assert nbformat.read(demos / "quickstart.ipynb", 4).metadata["kernelspec"]["display_name"] == (
        "old name"
    )
    (copy / "README.md").write_text("my notes")  # the user's
    (demos / "README.md").write_text("read me, v2")
    notebook.cells.append(nbformat.v4.new_code_cell("1"))
    nbformat.write(notebook, demos / "quickstart.ipynb")
    assert demos_root(package, home, names) == copy
    assert (copy / "README.md").read_text() == "my notes"
    assert len(nbformat.read(copy / "quickstart.ipynb", 4).cells) == 1  # followed the demos


def test_demos_root_outside_a_checkout_copies_the_packaged_demos(tmp_path: Path) -> None:
    package = tmp_path / "site-packages" / "mig_kernel"
    (package / "demos").mkdir(parents=True)
    (package / "demos" / "quickstart.ipynb").write_text("{}")
    home = tmp_path / "home"
    home.mkdir()
    copy = demos_root(package, home)
    assert copy == home / "mig-kernel-demos"
    assert (copy / "quickstart.ipynb").read_text() == "{}"
    assert demos_root(tmp_path / "bare" / "mig_kernel", home) is None


def test_labextension_path_links_the_checkouts_build(tmp_path: Path) -> None:
    package = tmp_path / "checkout" / "mig_kernel"
    (package / "labextension").mkdir(parents=True)
    (package / "labextension" / "package.json").write_text('{"name": "@mig-kernel/labextension"}')
    links = tmp_path / "links"
    links.mkdir()
    (links / "@mig-kernel").mkdir()
    (links / "@mig-kernel" / "labextension").symlink_to(tmp_path / "gone")  # a stale link

    assert labextension_path(package, links) == links
    link = links / "@mig-kernel" / "labextension"
    assert link.resolve() == (package / "labextension").resolve()
    assert json.loads((link / "package.json").read_text())["name"] == "@mig-kernel/labextension"
    argv = jupyterlab_argv(tmp_path, LabOptions(open_browser=False), links)
    assert f"--LabApp.extra_labextensions_path={links}" in argv


def test_labextension_path_is_none_without_a_build(tmp_path: Path) -> None:
    package = tmp_path / "site-packages" / "mig_kernel"
    package.mkdir(parents=True)  # an installed wheel: the build is in share/jupyter/labextensions
    links = tmp_path / "links"
    links.mkdir()
    assert labextension_path(package, links) is None
    assert list(links.iterdir()) == []
    argv = jupyterlab_argv(tmp_path, LabOptions(open_browser=False))
    assert not any("labextensions_path" in arg for arg in argv)
