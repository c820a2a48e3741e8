"""The JupyterLab extension in a real browser: ``mig-kernel lab`` as a user runs it, driven
through Debian's Chromium by Playwright (never a browser Playwright downloads).

A notebook on a lazy mig kernel shows "GPU slice: none" in the status bar; its ``%%gpufunc``
cell leases a slice and the status bar shows profile, memory, idle countdown and isolation
(and nothing while a plain ipykernel notebook is the active one). The "GPU slices" panel,
opened from the command palette, marks that slice as the user's own, in the light and the
dark theme (screenshots in test-artifacts/); its Release button gives the slice back. Then
lab stops on SIGTERM.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from mig_kernel.jupyter.kernelspec import kernel_json
from tests.support.lab import Lab

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)"
    ),
]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
BUILT = REPO / "mig_kernel" / "labextension" / "package.json"  # a checkout's own build
LAYOUT = "H100-80GB:3g.40gb,2g.20gb,1g.10gb,1g.10gb"
LAZY = "mig-python3-lazy"
NOTEBOOK = "lazy.ipynb"
PLAIN = "plain.ipynb"  # an ordinary ipykernel notebook: no status bar item
GPU_CELL = (
    "%%gpufunc\n"
    "block = xp.ones((384, 1024, 1024), dtype=xp.uint8)  # 384 MiB that stay on the slice\n"
    'print("block is on the slice")'
)
# The machine has no network: Chromium's own background connections would only fail.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000
# The dark theme's stylesheet is in effect (the attribute is set before it loads).
DARK_LOADED = (
    "getComputedStyle(document.body).getPropertyValue('--jp-layout-color1').trim() !== 'white'"
)
LEASED = re.compile(r"^GPU 1g\.10gb · 0\.[1-9]/9\.8 GiB · idle \d+:\d\d · sim$")


def prepare(lab: Lab) -> Path:
    """Before start: a lazy mig kernelspec in the user data dir (where `mig-kernel lab`'s
    pruning of its own prefix does not reach), a notebook using it, and no news pop-up."""
    spec_dir = lab.data_dir / "kernels" / LAZY
    spec_dir.mkdir(parents=True)
    spec = kernel_json(None, "Python 3 (lazy GPU slice)", acquire="lazy")
    (spec_dir / "kernel.json").write_text(json.dumps(spec))

    settings = lab.config_dir / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    quiet = {"fetchNews": "false", "checkForUpdates": False}
    (settings / "notification.jupyterlab-settings").write_text(json.dumps(quiet))

    root = lab.root / "notebooks"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": LAZY,
        "display_name": "Python 3 (lazy GPU slice)",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_markdown_cell("A lazy kernel leases its slice at the first GPU cell."),
        nbformat.v4.new_code_cell(GPU_CELL),
    ]
    nbformat.write(nb, root / NOTEBOOK)
    plain = nbformat.v4.new_notebook()
    plain.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)"}
    nbformat.write(plain, root / PLAIN)
    return root


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    root = tmp_path / "lab"
    root.mkdir()
    lab = Lab(root, root / "state", [])
    notebooks = prepare(lab)
    lab.args = ["--backend", "sim", "--sim-layout", LAYOUT, "--root-dir", str(notebooks)]
    lab.start()
    try:
        yield lab
    finally:
        lab.kill()


def run_command(page: Any, label: str) -> None:
    """Run a command from the command palette, as a user would."""
    page.keyboard.press("Control+Shift+C")
    page.locator(".lm-CommandPalette-input").fill(label)
    palette = page.locator(".lm-CommandPalette-content")
    palette.get_by_text(label, exact=True).click()


def test_status_bar_and_panel_follow_a_kernels_slice(lab: Lab) -> None:
    from playwright.sync_api import expect, sync_playwright

    lab.wait_ready()
    ARTIFACTS.mkdir(exist_ok=True)
    page_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(f"http://127.0.0.1:{lab.port}/lab/tree/{NOTEBOOK}?token={lab.token}")

            # The extension is loaded, from the checkout's own build when there is one.
            status = page.locator('[data-mig-kernel="status"]')
            expect(status).to_have_text("GPU slice: none", timeout=60_000)
            expect(page.locator("#jp-main-statusbar")).to_contain_text("| Idle")
            config = page.evaluate(
                "JSON.parse(document.getElementById('jupyter-config-data').textContent)"
            )
            federated = config["federated_extensions"]
            ours = [e for e in federated if e["name"] == "@mig-kernel/labextension"]
            assert len(ours) == 1, federated
            if BUILT.exists():
                build = json.loads(BUILT.read_text())["jupyterlab"]["_build"]
                assert ours[0]["load"] == build["load"]

            # The GPU cell leases a slice: the status bar shows it.
            page.locator(".jp-CodeCell .cm-content").first.click()
            page.keyboard.press("Shift+Enter")
            expect(page.locator(".jp-OutputArea-output").first).to_contain_text(
                "block is on the slice", timeout=TIMEOUT_MS
            )
            expect(status).to_have_text(LEASED, timeout=TIMEOUT_MS)

            # The item follows the active notebook: hidden for a plain kernel, back after.
            page.locator(".jp-DirListing-item", has_text=PLAIN).dblclick()
            expect(page.locator("#jp-main-statusbar")).to_contain_text(
                "Python 3 (ipykernel) | Idle", timeout=60_000
            )
            expect(status).to_be_hidden(timeout=TIMEOUT_MS)
            page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text=NOTEBOOK).click()
            expect(status).to_have_text(LEASED, timeout=TIMEOUT_MS)

            # The panel: the user's slice among the others, which are free.
            run_command(page, "Show GPU Slices")
            panel = page.locator("#mig-kernel-panel")
            expect(panel).to_be_visible()
            mine = panel.locator('[data-mig-mine="true"]')
            expect(mine).to_have_count(1, timeout=TIMEOUT_MS)
            expect(mine).to_have_attribute("data-mig-state", "leased")
            expect(mine).to_contain_text("yours")
            expect(mine).to_contain_text("1g.10gb")
            expect(mine).to_contain_text(f"held by your kernel of {NOTEBOOK}")
            expect(mine).to_contain_text(re.compile(r"idle \d+:\d\d"))
            expect(panel.locator('[data-mig-mine="false"]')).to_have_count(3)
            expect(panel.locator('[data-mig-mine="false"][data-mig-state="free"]')).to_have_count(3)
            expect(panel.locator(".jp-mig-Queue")).to_have_text("Queue: empty")
            page.screenshot(path=str(ARTIFACTS / "lab-panel-light.png"))

            run_command(page, "Use Theme: JupyterLab Dark")
            expect(page.locator("body")).to_have_attribute(
                "data-jp-theme-light", "false", timeout=TIMEOUT_MS
            )
            expect(page.locator("#jupyterlab-splash")).to_have_count(0, timeout=TIMEOUT_MS)
            page.wait_for_function(DARK_LOADED, timeout=TIMEOUT_MS)
            expect(mine).to_contain_text("yours")
            page.screenshot(path=str(ARTIFACTS / "lab-panel-dark.png"))

            # Release gives the slice back: nothing of the user's left, the status bar says so.
            mine.get_by_role("button", name="Release").click()
            expect(mine).to_have_count(0, timeout=TIMEOUT_MS)
            expect(panel.locator('[data-mig-state="leased"]')).to_have_count(0)
            expect(status).to_have_text("GPU slice: none", timeout=TIMEOUT_MS)
            expect(panel).to_contain_text("Released")
        finally:
            browser.close()
    assert page_errors == []

    assert lab.terminate() == 0, lab.log()
