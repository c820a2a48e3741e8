"""mig-kernel kernels under a real jupyter_server (pytest-jupyter's server fixtures): started and
deleted through the REST API, and restarted by the server's kernel restarter after a crash."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mig_kernel.jupyter.kernelspec import kernel_json
from mig_kernel.testing import BrokerProcess

pytest_plugins = ["pytest_jupyter.jupyter_server"]

Fetch = Callable[..., Awaitable[Any]]


@pytest.fixture
def mig_spec(
    jp_data_dir: Path,
    make_broker: Callable[..., BrokerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> BrokerProcess:
    """A sim broker for the server's kernels, and the mig-python3 kernelspec in its data dir."""
    broker = make_broker()
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    spec_dir = jp_data_dir / "kernels" / "mig-python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json(None, "GPU slice (any)")))
    return broker


def tagged(broker: BrokerProcess, kernel_id: str) -> list[dict[str, Any]]:
    with broker.client() as client:
        return client.leases(tag=f"kernel:{kernel_id}")


async def eventually(check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached within {timeout} s")


async def test_server_kernel_holds_a_slice_until_deleted(
    jp_fetch: Fetch, jp_serverapp: Any, mig_spec: BrokerProcess
) -> None:
    response = await jp_fetch(
        "api", "kernels", method="POST", body=json.dumps({"name": "mig-python3"})
    )
    kernel_id = json.loads(response.body)["id"]
    [lease] = tagged(mig_spec, kernel_id)
    assert lease["slice"]["profile"] == "1g.10gb"

    # A crash: the server's restarter starts a new kernel process, which keeps the slice.
    manager = jp_serverapp.kernel_manager.get_kernel(kernel_id)
    old_pid = manager.provisioner.process.pid
    os.kill(old_pid, signal.SIGKILL)
    await eventually(
        lambda: (
            manager.provisioner.process is not None
            and manager.provisioner.process.pid != old_pid
            and manager.provisioner.process.poll() is None
            # and the restart itself is over: jupyter_client cannot shut down a kernel whose
            # restart is still under way (its ``ready`` future not yet resolved)
            and manager.ready.done()
        ),
        timeout=30,
    )
    [after] = tagged(mig_spec, kernel_id)
    assert after["id"] == lease["id"]

    await jp_fetch("api", "kernels", kernel_id, method="DELETE")
    assert await eventually(lambda: tagged(mig_spec, kernel_id) == [], timeout=10)
