"""Notebook integration with real kernels: jupyter_client KernelManagers start mig-kernel
kernels through the installed ``mig-provisioner`` against a real (simulated) broker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mig_kernel.testing import BrokerProcess, wait_until
from tests.support.kernels import Kernels

LAYOUT = "H100-80GB:3g.40gb,2g.20gb,1g.10gb,1g.10gb"
Node = tuple[BrokerProcess, Kernels]


@pytest.fixture
def make_node(
    make_broker: Callable[..., BrokerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Node]]:
    """A broker (extra broker flags as arguments) and a kernelspec dir; kernels are stopped at
    teardown, before the broker."""
    made: list[Kernels] = []

    def make(*broker_args: str, multi_user: bool = False) -> Node:
        broker = make_broker(*broker_args, layout=LAYOUT, multi_user=multi_user)
        monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
        kernels = Kernels(tmp_path / f"kernels-{len(made)}")
        made.append(kernels)
        return broker, kernels

    yield make
    for kernels in made:
        kernels.stop_all()


def tagged(broker: BrokerProcess, tag: str) -> list[dict[str, Any]]:
    with broker.client() as client:
        return client.leases(tag=tag)


def test_eager_kernel_holds_its_slice_and_no_gpu(make_node: Callable[..., Node]) -> None:
    broker, kernels = make_node()
    kernel = kernels.start(
        kernels.spec("mig-1g", "1g.10gb"),
        env={"NVIDIA_VISIBLE_DEVICES": "all", "CUDA_VISIBLE_DEVICES": "0"},
    )
    [lease] = tagged(broker, kernel.tag)
    assert lease["slice"]["profile"] == "1g.10gb"
    cell = kernel.run(
        "import os\n"
        "print(repr(os.environ['CUDA_VISIBLE_DEVICES']))\n"
        "print(sorted(k for k in os.environ if k.startswith('NVIDIA_')))"
    )
    assert cell.stdout.splitlines() == ["''", "[]"]
    status = kernel.run("%gpu status")
    assert lease["slice"]["id"] in status.stdout
    assert "isolation  sim" in status.stdout
    assert lease["id"] in status.stdout


def test_gpufunc_cell_inputs_outputs_display_and_errors(make_node: Callable[..., Node]) -> None:
    _, kernels = make_node()
    kernel = kernels.start(kernels.spec("mig-any"))
    kernel.run("import numpy as np\nx = np.arange(16.0)\nunused = np.ones(10**7)")
    cell = kernel.run(
        "%%gpufunc\n"
        "y = xp.fft.fft(xp.asarray(x)).real\n"
        "print('on the slice', xp.__name__, type(y).__name__, y.shape)\n"
        "n = int(y.size)\n"
        "float(y[0])"
    )
    assert cell.status == "ok", cell.traceback
    assert cell.stdout == "on the slice numpy SimDeviceArray (16,)\n"
    assert cell.results == ["120.0"]
    check = kernel.run(
        "import mig_kernel\n"
        "assert isinstance(y, mig_kernel.RemoteArray), type(y)\n"
        "assert np.allclose(y.get(), np.fft.fft(x).real)\n"
        "print(n, 'unused' in dir())"
    )
    assert check.stdout == "16 True\n", check.traceback
    to_host = kernel.run("%%gpufunc --to-host\nz = y * 2\ndel n")
    assert to_host.status == "ok", to_host.traceback
    check = kernel.run("print(type(z).__name__, z[0], 'n' in dir())")
    assert check.stdout == "ndarray 240.0 False\n"

    error = kernel.run("%%gpufunc\na = 1\nb = a / 0\n")
    assert error.status == "error"
    assert error.error is not None and error.error["ename"] == "ZeroDivisionError"
    assert "Cell In[" in error.traceback and "line 3" in error.traceback  # as the editor counts
    assert "b = a / 0" in error.traceback
    assert "dataplane.py" not in error.traceback  # the executor's frames are not shown


def test_magic_misuse_is_refused_before_anything_is_sent(make_node: Callable[..., Node]) -> None:
    broker, kernels = make_node()
    kernel = kernels.start(kernels.spec("mig-lazy", "1g.10gb", acquire="lazy"))
    assert tagged(broker, kernel.tag) == []
    bad_option = kernel.run("%%gpufunc --bogus\nx = 1")
    assert bad_option.error is not None and bad_option.error["ename"] == "UsageError"
    assert "--bogus" in bad_option.error["evalue"]
    bad_profile = kernel.run("%%gpufunc --profile 7g.80gb\nx = 1")
    assert bad_profile.error is not None and bad_profile.error["ename"] == "UsageError"
    assert "7g.80gb" in bad_profile.error["evalue"] and "1g.10gb" in bad_profile.error["evalue"]
    syntax = kernel.run("%%gpufunc\nx = (\n")
    assert syntax.error is not None and syntax.error["ename"] == "SyntaxError"
    assert "(Cell In[" in syntax.error["evalue"] and "line 2)" in syntax.error["evalue"]
    assert "never closed" in syntax.error["evalue"]
    magic_inside = kernel.run("%%gpufunc\n!ls\n")
    assert magic_inside.error is not None and magic_inside.error["ename"] == "UsageError"
    timeout = kernel.run("%%gpufunc --timeout -1\nx = 1")
    assert timeout.error is not None and "--timeout" in timeout.error["evalue"]
    assert tagged(broker, kernel.tag) == []  # lazy and nothing ran: still no lease
    ok = kernel.run("%%gpufunc\nx = 1")
    assert ok.status == "ok" and len(tagged(broker, kernel.tag)) == 1


def test_decorator_and_monitor(make_node: Callable[..., Node]) -> None:
    _, kernels = make_node()
    kernel = kernels.start(kernels.spec("mig-any"))
    cell = kernel.run(
        "import numpy as np, mig_kernel\n"
        "@mig_kernel.gpufunc\n"
        "def norm(a):\n"
        "    return xp.sqrt((xp.asarray(a) ** 2).sum(axis=0))\n"
        "@mig_kernel.gpufunc(to_host=True)\n"
        "def twice(a):\n"
        "    return norm(a) * 2\n"  # a decorated function called on the slice runs there
        "r = norm(np.ones((4, 3)))\n"
        "print(type(r).__name__, r.shape, r.get().tolist(), twice(np.ones((4, 3))).tolist())"
    )
    assert cell.stdout == "RemoteArray (3,) [2.0, 2.0, 2.0] [4.0, 4.0, 4.0]\n", cell.traceback
    # without ipywidgets the monitor is a table (the widget: tests/test_widgets.py)
    monitor = kernel.run("import sys\nsys.modules['ipywidgets'] = None\n%gpu monitor")
    first, *table = monitor.stdout.splitlines()
    assert first.startswith("mig-kernel: no live monitor (") and "ipywidgets" in first
    assert len(table) >= 6  # header lines + four slices
    for profile in ("3g.40gb", "2g.20gb", "1g.10gb"):
        assert profile in monitor.stdout
    assert "leased" in monitor.stdout and "this kernel's user" in monitor.stdout


def test_release_and_idle_reclaim_restore_device_arrays(make_node: Callable[..., Node]) -> None:
    broker, kernels = make_node()
    kernel = kernels.start(kernels.spec("mig-idle", "1g.10gb", idle_timeout=1))
    setup = kernel.run("import numpy as np")
    assert setup.status == "ok"
    first = kernel.run("%%gpufunc\ny = xp.arange(5.0)")
    assert first.status == "ok", first.traceback
    [lease] = tagged(broker, kernel.tag)
    wait_until(lambda: tagged(broker, kernel.tag) == [], timeout=30)  # idle past 1 s
    back = kernel.run("%%gpufunc\nw = y + 1")
    assert back.status == "ok", back.traceback
    [line] = back.stdout.splitlines()
    assert line.startswith("mig-kernel: slice re-acquired in ")
    assert "1 device object restored" in line
    assert kernel.run("print(w.get().tolist())").stdout == "[1.0, 2.0, 3.0, 4.0, 5.0]\n"
    [again] = tagged(broker, kernel.tag)
    assert again["id"] != lease["id"] and again["idle_timeout"] == 1

    released = kernel.run("%gpu release")
    assert "kept on the host" in released.stdout, released.stdout
    assert tagged(broker, kernel.tag) == []
    status = kernel.run("%gpu status")
    assert "given back (suspended)" in status.stdout
    restored = kernel.run("%%gpufunc --to-host\nv = w * 10")
    assert "re-acquired" in restored.stdout
    assert kernel.run("print(v.tolist())").stdout == "[10.0, 20.0, 30.0, 40.0, 50.0]\n"


def test_restart_keeps_the_slice_and_shutdown_releases_it(make_node: Callable[..., Node]) -> None:
    broker, kernels = make_node()
    kernel = kernels.start(kernels.spec("mig-1g", "1g.10gb"))
    [lease] = tagged(broker, kernel.tag)
    kernel.run("%%gpufunc\nbig = xp.ones(1000)")
    kernel.restart()
    [after] = tagged(broker, kernel.tag)
    assert after["id"] == lease["id"]
    status = kernel.run("%gpu status")
    assert lease["id"] in status.stdout
    cell = kernel.run("%%gpufunc\nprint(int(xp.arange(4).sum()))")
    assert cell.stdout == "6\n"
    kernel.shutdown()
    wait_until(lambda: tagged(broker, kernel.tag) == [], timeout=10)
    slices = broker.status()["slices"]
    assert all(s["lease"] is None for s in slices)


def test_killed_kernel_loses_its_slice_within_the_heartbeat_window(
    make_node: Callable[..., Node],
) -> None:
    broker, kernels = make_node("--Broker.heartbeat_interval=0.5")
    kernel = kernels.start(kernels.spec("mig-1g", "1g.10gb"))
    [lease] = tagged(broker, kernel.tag)
    kernel.kill_hard()
    killed = time.monotonic()
    wait_until(lambda: tagged(broker, kernel.tag) == [], timeout=15)
    assert time.monotonic() - killed < 0.5 * 3 + 2.0  # window plus the broker's check period
    with broker.client() as client:
        assert client.request("heartbeat", lease_ids=[lease["id"]])["leases"][lease["id"]] == {
            "state": "ended",
            "reason": "holder_lost",
        }


def test_two_kernels_get_two_slices(make_node: Callable[..., Node]) -> None:
    broker, kernels = make_node("--per-user-limit", "2")
    spec = kernels.spec("mig-1g", "1g.10gb")
    first, second = kernels.start(spec), kernels.start(spec)
    [a], [b] = tagged(broker, first.tag), tagged(broker, second.tag)
    assert a["slice"]["id"] != b["slice"]["id"]
    cell = "%%gpufunc\nimport os\npid = os.getpid()\npid"
    pids = [int(k.run(cell).results[0]) for k in (first, second)]
    assert pids[0] != pids[1]


def test_a_second_notebook_waits_for_the_users_slice(make_node: Callable[..., Node]) -> None:
    """Per-user limit 1 and free slices left: the second notebook's kernel starts without a
    slice and says why; its GPU cell waits in the queue naming the first notebook, and runs
    once that one releases. The waiting line is replaced by the outcome."""
    broker, kernels = make_node()
    spec = kernels.spec("mig-1g", "1g.10gb")
    first = kernels.start(spec, env={"JPY_SESSION_NAME": "/srv/work/first.ipynb"})
    second = kernels.start(spec, env={"JPY_SESSION_NAME": "/srv/work/second.ipynb"})
    assert len(tagged(broker, first.tag)) == 1 and tagged(broker, second.tag) == []
    status = second.run("%gpu status").stdout
    assert "GPU slice: none — user" in status and "/srv/work/first.ipynb (1g.10gb" in status
    msg_id = second.start_cell("%%gpufunc\nprint('the second notebook runs')")
    shown = second.wait_for_output(msg_id, "first.ipynb")
    assert "position 1 of 1 in the queue" in shown and "`%gpu release` in that notebook" in shown
    assert "released" in first.run("%gpu release").stdout
    reply = second.wait_reply(msg_id)
    assert reply["content"]["status"] == "ok"
    [lease] = tagged(broker, second.tag)
    assert lease["request"]["label"] == "/srv/work/second.ipynb"
    again = second.run("%%gpufunc\nprint('again')")
    assert again.stdout == "again\n"


def test_interrupt_cancels_a_queued_wait(make_node: Callable[..., Node]) -> None:
    broker, kernels = make_node("--per-user-limit", "4", multi_user=True)
    holders = []
    for _ in range(4):  # another user takes every slice
        client = broker.client("alice")
        holders.append(client)
        client.acquire(wait=False)
    try:
        kernel = kernels.start(kernels.spec("mig-1g", "1g.10gb"))
        assert tagged(broker, kernel.tag) == []  # started without a slice
        msg_id = kernel.start_cell("%%gpufunc\nx = 1")
        shown = kernel.wait_for_output(msg_id, "position 1 of 1")
        assert "waiting for a 1g.10gb slice" in shown
        kernel.interrupt()
        reply = kernel.wait_reply(msg_id)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        wait_until(lambda: broker.status()["queue"] == [], timeout=5)
    finally:
        for client in holders:
            client.close()


def test_interrupt_stops_a_running_cell(make_node: Callable[..., Node]) -> None:
    _, kernels = make_node()
    kernel = kernels.start(kernels.spec("mig-1g", "1g.10gb"))
    msg_id = kernel.start_cell(
        "%%gpufunc\nimport time\nfor i in range(600):\n    print('step', i)\n    time.sleep(0.05)"
    )
    kernel.wait_for_output(msg_id, "step 3")
    interrupted = time.monotonic()
    kernel.interrupt()
    reply = kernel.wait_reply(msg_id)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - interrupted < 5.0  # not the 30 s the loop would take
    after = kernel.run("%%gpufunc\nprint('next cell runs')")
    assert after.stdout == "next cell runs\n"


def test_shutdown_after_release_discards_the_kept_data(make_node: Callable[..., Node]) -> None:
    broker, kernels = make_node()
    kernel = kernels.start(kernels.spec("mig-1g", "1g.10gb"))
    [lease] = tagged(broker, kernel.tag)
    kernel.run("%%gpufunc\nkept = xp.ones(1000)")
    assert "1 device object kept" in kernel.run("%gpu release").stdout
    spill = broker.state_dir / "spill" / lease["id"]
    assert (spill / "manifest.json").exists()
    kernel.shutdown()
    wait_until(lambda: not spill.exists(), timeout=10, what="spill directory removed")
