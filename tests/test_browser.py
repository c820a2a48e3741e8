"""The JupyterLab extension in a real browser: ``mig-kernel lab`` as a user runs it, driven
through Debian's Chromium by Playwright (never a browser Playwright downloads).

- Two notebooks of one user with a limit of one slice each: the first leases at its GPU cell
  (status bar), ``%gpu monitor`` draws the node in it; the second's GPU cell waits in the queue
  saying which notebook holds the user's slice; the panel marks "this notebook" and shows the
  wait at the top; Release (after a dialog saying the data is kept) lets the second one run; a
  running cell shows in the status bar and the panel; the note about the release clears itself.
  Screenshots of the light and the dark theme in test-artifacts/.
- Four GPUs, 28 slices: the panel stays a compact list.
- A broker admin (root, on a multi-user broker) releases another OS user's slice from the panel.
- ``make run`` as a user meets it: both demos run in JupyterLab, and the checkout stays as it
  was (JupyterLab works on a copy in the home directory). Its screenshot is the README's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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
        CHROMIUM is None,
        reason="Debian's chromium is not installed: `apt-get install chromium` (.ci/run does)",
    ),
]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
BUILT = REPO / "mig_kernel" / "labextension" / "package.json"  # a checkout's own build
LAYOUT = "H100-80GB:3g.40gb,2g.20gb,1g.10gb,1g.10gb"
LAZY = "mig-python3-lazy"
FIRST, SECOND = "first.ipynb", "second.ipynb"
PLAIN = "plain.ipynb"  # an ordinary ipykernel notebook: no status bar item
GPU_CELL = (
    "%%gpufunc --profile 1g.10gb\n"
    "block = xp.ones((384, 1024, 1024), dtype=xp.uint8)  # 384 MiB that stay on the slice\n"
    'print("{name} is on the slice")'
)
MONITOR_CELL = "%gpu monitor"
SLOW_CELL = "%%gpufunc\nimport time\ntime.sleep(6)  # a long call"
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
LEASED = re.compile(r"^GPU 1g\.10gb · 0\.\d\d/9\.75 GiB · idle \d+:\d\d · sim$")


def quiet_settings(lab: Lab) -> None:
    """No news pop-up asking to fetch news (the machine is offline anyway)."""
    settings = lab.config_dir / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    quiet = {"fetchNews": "false", "checkForUpdates": False}
    (settings / "notification.jupyterlab-settings").write_text(json.dumps(quiet))


def prepare(lab: Lab) -> Path:
    """Before start: a lazy mig kernelspec in the user data dir (where `mig-kernel lab`'s
    pruning of its own prefix does not reach), two notebooks using it, a plain one."""
    spec_dir = lab.data_dir / "kernels" / LAZY
    spec_dir.mkdir(parents=True)
    display = "GPU slice (any, lazy, simulated)"
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json(None, display, acquire="lazy")))
    quiet_settings(lab)
    root = lab.root / "notebooks"
    root.mkdir()
    for name, extra in ((FIRST, [MONITOR_CELL]), (SECOND, [SLOW_CELL])):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": LAZY, "display_name": display, "language": "python"}
        nb.cells = [
            nbformat.v4.new_markdown_cell("A lazy kernel leases its slice at the first GPU cell."),
            nbformat.v4.new_code_cell(GPU_CELL.format(name=name)),
            *(nbformat.v4.new_code_cell(source) for source in extra),
        ]
        nbformat.write(nb, root / name)
    plain = nbformat.v4.new_notebook()
    plain.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)"}
    nbformat.write(plain, root / PLAIN)
    return root


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Any]:
    labs: list[Lab] = []

    def make(*args: str, prepared: bool = True) -> Lab:
        root = tmp_path / f"lab{len(labs)}"
        root.mkdir()
        lab = Lab(root, root / "state", [])
        if prepared:
            lab.args = ["--root-dir", str(prepare(lab))]
        else:
            quiet_settings(lab)
        lab.args = ["--backend", "sim", *args, *lab.args]
        labs.append(lab)
        lab.start()
        return lab

    yield make
    for lab in labs:
        lab.kill()


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, lab: Lab, path: str = "") -> tuple[Any, list[str]]:
    errors: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"http://127.0.0.1:{lab.port}/lab{path}?token={lab.token}")
    page.locator(".jp-DirListing-item").first.wait_for(timeout=60_000)  # the app is up
    page.locator("#jupyterlab-splash").wait_for(state="detached", timeout=60_000)
    return page, errors


def run_command(page: Any, label: str) -> None:
    """Run a command from the command palette, as a user would."""
    page.keyboard.press("Control+Shift+C")
    page.locator(".lm-CommandPalette-input").fill(label)
    palette = page.locator(".lm-CommandPalette-content")
    palette.get_by_text(label, exact=True).click()


def run_cell(page: Any, marker: str) -> Any:
    """Shift+Enter in the code cell whose source contains ``marker``; returns the cell."""
    cell = page.locator(".jp-CodeCell", has_text=marker)
    cell.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    return cell


def open_notebook(page: Any, name: str) -> None:
    page.locator(".jp-DirListing-item", has_text=name).dblclick()
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text=name).wait_for()


def kernel_idle(page: Any) -> None:
    """The active notebook's kernel has started (a cell sent before is not run)."""
    from playwright.sync_api import expect

    kernel_status = page.locator("#jp-main-statusbar .jp-StatusItem-kernel, #jp-main-statusbar")
    expect(kernel_status.last).to_contain_text("| Idle", timeout=60_000)
    page.wait_for_function(
        "() => { const s = window.jupyterapp?.shell?.currentWidget?.sessionContext;"
        " return !s || s.session?.kernel?.status === 'idle'; }",
        timeout=60_000,
    )


def to_tab(page: Any, name: str) -> None:
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text=name).click()


def test_two_notebooks_the_panel_and_the_monitor(make_lab, browser) -> None:
    from playwright.sync_api import expect

    lab = make_lab("--sim-layout", LAYOUT, "--per-user-limit", "1")
    lab.wait_ready()
    page, page_errors = open_page(browser, lab, f"/tree/{FIRST}")

    # The extension is loaded, from the checkout's own build when there is one.
    status = page.locator('[data-mig-kernel="status"]')
    expect(status).to_have_text("GPU slice: none", timeout=60_000)
    expect(page.locator("#jp-main-statusbar")).to_contain_text("| Idle")
    config = page.evaluate("JSON.parse(document.getElementById('jupyter-config-data').textContent)")
    ours = [e for e in config["federated_extensions"] if e["name"] == "@mig-kernel/labextension"]
    assert len(ours) == 1, config["federated_extensions"]
    if BUILT.exists():
        assert ours[0]["load"] == json.loads(BUILT.read_text())["jupyterlab"]["_build"]["load"]

    # The first notebook's GPU cell leases a slice: the status bar shows it.
    first_cell = run_cell(page, f"{FIRST} is on the slice")
    expect(first_cell.locator(".jp-OutputArea-output")).to_contain_text(
        f"{FIRST} is on the slice", timeout=TIMEOUT_MS
    )
    expect(status).to_have_text(LEASED, timeout=TIMEOUT_MS)

    # %gpu monitor draws the node in the notebook, this notebook's slice apart.
    monitor = run_cell(page, MONITOR_CELL).locator(".mig-monitor")
    expect(monitor.locator(".mig-slice.mig-this")).to_have_count(1, timeout=TIMEOUT_MS)
    expect(monitor.locator(".mig-slice.mig-this")).to_contain_text("this notebook")
    expect(monitor.locator(".mig-monitor-header")).to_contain_text("queue: empty")

    # The item follows the active notebook: hidden for a plain kernel, back after.
    open_notebook(page, PLAIN)
    expect(page.locator("#jp-main-statusbar")).to_contain_text(
        "Python 3 (ipykernel) | Idle", timeout=60_000
    )
    expect(status).to_be_hidden(timeout=TIMEOUT_MS)
    to_tab(page, FIRST)
    expect(status).to_have_text(LEASED, timeout=TIMEOUT_MS)

    # The panel: this notebook's slice, the three others free, nobody waiting.
    run_command(page, "Show GPU Slices")
    panel = page.locator("#mig-kernel-panel")
    expect(panel).to_be_visible()
    this = panel.locator('[data-mig-this="true"]')
    expect(this).to_have_count(1, timeout=TIMEOUT_MS)
    expect(this).to_have_attribute("data-mig-state", "leased")
    expect(this).to_contain_text("this notebook")
    expect(this).to_contain_text(re.compile(r"0\.\d\d/9\.75 GiB"))
    expect(this).to_have_attribute("title", re.compile(r"isolation sim$"))
    expect(this).to_contain_text(re.compile(r"idle \d+:\d\d"))
    expect(panel.locator('[data-mig-mine="false"][data-mig-state="free"]')).to_have_count(3)
    expect(panel.locator(".jp-mig-Queue")).to_have_text("Queue: empty")
    page.screenshot(path=str(ARTIFACTS / "lab-panel-light.png"))

    # The second notebook of the same user: its GPU cell waits, naming the first notebook.
    open_notebook(page, SECOND)
    expect(status).to_have_text("GPU slice: none", timeout=60_000)
    kernel_idle(page)
    second_cell = run_cell(page, f"{SECOND} is on the slice")
    waiting = second_cell.locator(".jp-OutputArea-output")
    expect(waiting).to_contain_text("position 1 of 1 in the queue", timeout=TIMEOUT_MS)
    expect(waiting).to_contain_text(f"{FIRST} (1g.10gb on")
    expect(waiting).to_contain_text("`%gpu release` in that notebook")
    expect(status).to_have_text("GPU slice: queued #1", timeout=TIMEOUT_MS)
    queue = panel.locator(".jp-mig-Queue")
    expect(queue).to_contain_text("1 request waiting", timeout=TIMEOUT_MS)
    expect(queue.locator('[data-mig-waiting-for="quota"]')).to_contain_text(f"you ({SECOND})")
    first_slice = panel.locator('[data-mig-mine="true"]')
    expect(first_slice).to_have_attribute("data-mig-this", "false")  # not this notebook's
    expect(first_slice).to_contain_text("yours")
    expect(first_slice).to_contain_text(f"in {FIRST}")
    assert panel.evaluate(
        "p => p.querySelector('.jp-mig-Queue') === p.querySelector('.jp-mig-Node').children[1]"
    )  # the queue comes first

    # The monitor in the first notebook has followed (from its kernel's thread).
    to_tab(page, FIRST)
    expect(monitor.locator(".mig-monitor-header")).to_contain_text("queue: 1 waiting")

    # Release, neutral and confirmed: the dialog says the data is kept.
    release = panel.locator('[data-mig-this="true"]').get_by_role("button", name="Release")
    rgb = release.evaluate("b => getComputedStyle(b).backgroundColor")
    red, green, blue = (int(v) for v in re.findall(r"\d+", rgb)[:3])
    assert not (red > 150 and green < 110 and blue < 110), rgb  # neutral, not a red "destroy"
    release.click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Its device data is kept")
    dialog.get_by_role("button", name="Release").click()
    note = panel.locator(".jp-mig-Note")
    expect(note).to_contain_text(f"Released the slice of {FIRST}", timeout=TIMEOUT_MS)
    expect(status).to_have_text("GPU slice: none", timeout=TIMEOUT_MS)

    # The second notebook got the slice; its waiting line became the outcome.
    to_tab(page, SECOND)
    output = second_cell.locator(".jp-OutputArea")
    expect(output).to_contain_text(f"{SECOND} is on the slice", timeout=TIMEOUT_MS)
    expect(output).to_contain_text("after waiting")
    expect(output).not_to_contain_text("position 1 of 1")
    expect(status).to_have_text(LEASED, timeout=TIMEOUT_MS)
    expect(panel.locator('[data-mig-this="true"]')).to_have_count(1, timeout=TIMEOUT_MS)
    expect(panel.locator(".jp-mig-Queue")).to_have_text("Queue: empty", timeout=TIMEOUT_MS)

    # A running call shows: in the status bar at once, in the panel too.
    run_cell(page, "a long call")
    expect(status).to_contain_text("running", timeout=TIMEOUT_MS)
    busy = panel.locator('[data-mig-this="true"][data-mig-busy="true"]')
    expect(busy).to_contain_text("computing", timeout=TIMEOUT_MS)
    expect(status).to_have_text(LEASED, timeout=TIMEOUT_MS)  # done
    expect(note).to_have_count(0, timeout=TIMEOUT_MS)  # the note has cleared itself

    run_command(page, "Use Theme: JupyterLab Dark")
    expect(page.locator("body")).to_have_attribute(
        "data-jp-theme-light", "false", timeout=TIMEOUT_MS
    )
    expect(page.locator("#jupyterlab-splash")).to_have_count(0, timeout=TIMEOUT_MS)
    page.wait_for_function(DARK_LOADED, timeout=TIMEOUT_MS)
    expect(panel.locator('[data-mig-this="true"]')).to_contain_text("this notebook")
    page.screenshot(path=str(ARTIFACTS / "lab-panel-dark.png"))
    assert page_errors == []

    assert lab.terminate() == 0, lab.log()


def test_the_panel_stays_compact_with_four_gpus(make_lab, browser) -> None:
    """28 slices, seven of them the user's: two lines each, the queue in view at the top."""
    from playwright.sync_api import expect

    lab = make_lab("--sim-layout", ";".join(["H100-80GB:7x1g.10gb"] * 4))
    lab.wait_ready()
    connection = {"MIG_KERNEL_BROKER": str(lab.state_dir / "broker.json")}
    page, page_errors = open_page(browser, lab)
    run_command(page, "Show GPU Slices")
    panel = page.locator("#mig-kernel-panel")
    expect(panel.locator("[data-mig-slice]")).to_have_count(28, timeout=60_000)
    expect(panel.locator('[data-mig-state="free"]')).to_have_count(28, timeout=60_000)
    script = (
        "import os, mig_kernel\n"
        "held = [mig_kernel.connect(broker=os.environ['MIG_KERNEL_BROKER']) for _ in range(7)]\n"
        "input()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        env={**lab.env(), **connection, "PYTHONPATH": str(REPO)},
    )
    try:
        expect(panel.locator('[data-mig-mine="true"]')).to_have_count(7, timeout=TIMEOUT_MS)
        heights = panel.locator("[data-mig-slice]").evaluate_all(
            "nodes => nodes.map(n => n.getBoundingClientRect().height)"
        )
        line = page.evaluate(
            "parseFloat(getComputedStyle(document.querySelector('.jp-mig-Slice')).lineHeight)"
        )
        page.screenshot(path=str(ARTIFACTS / "lab-panel-28-slices.png"))
        assert max(heights) <= 3.5 * line, (heights, line)  # at most three short lines
        queue_top = panel.locator(".jp-mig-Queue").bounding_box()
        assert queue_top is not None and queue_top["y"] < 200  # in view without scrolling
    finally:
        holder.communicate(b"\n", timeout=30)
    assert page_errors == []
    assert lab.terminate() == 0, lab.log()


def checkout_notebooks() -> str:
    """What git says of notebooks and demos in the checkout (the porcelain lines)."""
    result = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", "demos", "*.ipynb"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    return "\n".join(line for line in lines if "ipynb" in line or "checkpoints" in line)


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_make_run_runs_both_demos_and_leaves_the_checkout_clean(make_lab, browser) -> None:
    from playwright.sync_api import expect

    before = checkout_notebooks()
    lab = make_lab("--sim-layout", LAYOUT, prepared=False)
    lab.wait_ready()
    copy = lab.root / "home" / "mig-kernel-demos"
    assert (copy / "quickstart.ipynb").exists() and "copied" in lab.log()
    page, page_errors = open_page(browser, lab, "/tree/quickstart.ipynb")  # as lab prints it
    status = page.locator('[data-mig-kernel="status"]')
    expect(status).to_be_visible(timeout=60_000)
    expect(page.locator("#jp-main-statusbar")).to_contain_text(
        "GPU slice (any, simulated) | Idle", timeout=60_000
    )
    for name, done in (("quickstart.ipynb", "QUICKSTART OK"), ("cnn_inference.ipynb", "CNN OK")):
        if name != "quickstart.ipynb":
            open_notebook(page, name)
            expect(page.locator("#jp-main-statusbar")).to_contain_text("| Idle", timeout=60_000)
        run_command(page, "Run All Cells")
        expect(page.locator(".jp-OutputArea-output", has_text=done)).to_have_count(
            1, timeout=180_000
        )
        page.keyboard.press("Control+s")
        if name == "quickstart.ipynb":
            run_command(page, "Show GPU Slices")
            expect(page.locator('#mig-kernel-panel [data-mig-this="true"]')).to_have_count(
                1, timeout=TIMEOUT_MS
            )
            page.screenshot(path=str(ARTIFACTS / "lab-make-run.png"))
    expect(page.locator(".jp-mod-dirty")).to_have_count(0, timeout=TIMEOUT_MS)  # saved
    saved = nbformat.read(copy / "cnn_inference.ipynb", 4)
    assert any(cell.get("outputs") for cell in saved.cells if cell.cell_type == "code")
    assert page_errors == []
    assert lab.terminate() == 0, lab.log()
    assert checkout_notebooks() == before  # outputs, checkpoints, new files: all in the copy


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates OS users, multi-user broker")
def test_an_admin_releases_another_users_slice(tmp_path: Path, browser) -> None:
    """A multi-user broker whose admin is root: root's JupyterLab panel shows mkt-alice's slice
    by her name with a Release button (her own user has none on others' slices: the broker's
    ``admin`` flag decides); the dialog says her data is dropped; the slice comes back free."""
    from playwright.sync_api import expect

    from .support.accounts import ensure_users
    from .test_multi_user import Driven, multi_user_node

    alice = ensure_users()["mkt-alice"]
    layout = ("--backend", "sim", "--sim-layout", "H100-80GB:2x1g.10gb")
    with multi_user_node(*layout, "--admin-users", "root") as node:
        tenant = Driven(alice, node["broker"].connection_file)
        lab: Lab | None = None
        try:
            lease = tenant("connect")
            assert "error" not in lease, lease
            lab = Lab(tmp_path, node["broker"].connection_file.parent, [])
            quiet_settings(lab)
            lab.start()
            lab.wait_ready()
            assert "using the broker already running" in lab.log()
            page, page_errors = open_page(browser, lab)
            run_command(page, "Show GPU Slices")
            panel = page.locator("#mig-kernel-panel")
            held = panel.locator('[data-mig-state="leased"]')
            expect(held).to_have_count(1, timeout=60_000)
            expect(held).to_contain_text("held by mkt-alice")
            expect(panel.locator('[data-mig-admin="true"]')).to_have_count(1)
            held.locator('[data-mig-admin="true"]').click()
            dialog = page.locator(".jp-Dialog")
            expect(dialog).to_contain_text("Release the slice of mkt-alice?")
            expect(dialog).to_contain_text("dropped, not kept")
            dialog.locator(".jp-mod-warn", has_text="Release").click()
            expect(panel.locator('[data-mig-state="free"]')).to_have_count(2, timeout=TIMEOUT_MS)
            expect(panel.locator(".jp-mig-Note")).to_contain_text("Released the slice of mkt-alice")
            page.screenshot(path=str(ARTIFACTS / "lab-panel-admin.png"))
            assert page_errors == []
            assert lab.terminate() == 0, lab.log()
        finally:
            if lab is not None:
                lab.kill()
            tenant.close()
