"""The jupyter_server extension (REST under /mig/api) in a real server (pytest-jupyter) with a
real sim broker and real mig kernels started through the server's REST API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError, HTTPResponse

import mig_kernel
import mig_kernel_rest
from mig_kernel.jupyter.kernelspec import kernel_json
from mig_kernel.jupyter.lab import LabOptions, jupyterlab_argv
from mig_kernel.testing import BrokerProcess, wait_until
from mig_kernel.wire.errors import AcquireCancelled, AcquireTimeout
from mig_kernel_rest import handlers as server_extension
from tests.support.lab import Lab

pytest_plugins = ["pytest_jupyter.jupyter_server"]

Fetch = Callable[..., Awaitable[HTTPResponse]]
LAYOUT = "H100-80GB:3g.40gb,1g.10gb,1g.10gb"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"mig_kernel": True}}}


@pytest.fixture
def node(
    jp_serverapp: Any,
    jp_data_dir: Path,
    jp_asyncio_loop: asyncio.AbstractEventLoop,
    make_broker: Callable[..., BrokerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[BrokerProcess]:
    """A sim broker (3 slices a user), the server's way to it ($MIG_KERNEL_BROKER) and two
    kernelspecs: eager
    (leases at start) and lazy (leases at its first GPU cell). Kernels still running at the
    end are shut down while the broker still runs."""
    broker = make_broker("--LeasePolicy.per_user_limit=3", layout=LAYOUT)
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    for name, spec in (
        ("mig-python3", kernel_json("1g.10gb", "Python 3 (MIG slice)")),
        ("mig-lazy", kernel_json("1g.10gb", "Python 3 (lazy)", acquire="lazy")),
    ):
        spec_dir = jp_data_dir / "kernels" / name
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
    yield broker
    jp_asyncio_loop.run_until_complete(jp_serverapp.kernel_manager.shutdown_all())


async def get_json(fetch: Fetch, *parts: str, **kwargs: Any) -> Any:
    response = await fetch("mig", "api", *parts, **kwargs)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    return json.loads(response.body)


async def settled(fetch: Fetch) -> dict[str, Any]:
    """The node's state once the broker has published everything of its start (the last
    executors warming up): a one-second long poll that sees no new publication."""
    state = await get_json(fetch, "slices")
    for _ in range(20):
        again = await get_json(fetch, "slices", params={"after": state["seq"], "timeout": 1})
        if again["seq"] == state["seq"]:
            return again
        state = again
    raise AssertionError(f"the broker kept publishing: seq {state['seq']}")


async def refused(fetch: Fetch, *parts: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of a request that must fail."""
    with pytest.raises(HTTPClientError) as info:
        await fetch("mig", "api", *parts, **kwargs)
    assert info.value.response is not None
    return info.value.code, json.loads(info.value.response.body)


async def start_kernel(fetch: Fetch, name: str = "mig-python3") -> str:
    response = await fetch("api", "kernels", method="POST", body=json.dumps({"name": name}))
    return str(json.loads(response.body)["id"])


def tagged(broker: BrokerProcess, kernel_id: str) -> list[dict[str, Any]]:
    with broker.client() as client:
        return client.leases(tag=f"kernel:{kernel_id}")


async def run_cell(serverapp: Any, kernel_id: str, code: str) -> str:
    """Execute one cell in a kernel of the server; returns its stdout (fails on an error)."""
    client = serverapp.kernel_manager.get_kernel(kernel_id).client()
    client.start_channels()
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    try:
        await client.wait_for_ready(timeout=60)
        reply = await client.execute_interactive(code, output_hook=hook, timeout=60)
    finally:
        client.stop_channels()
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


# ------------------------------------------------------------------------------- slices
async def test_slices_lists_the_nodes_slices_with_seq_and_pseudonym(
    jp_fetch: Fetch, node: BrokerProcess
) -> None:
    state = await get_json(jp_fetch, "slices")
    assert [s["profile"] for s in state["slices"]] == ["3g.40gb", "1g.10gb", "1g.10gb"]
    assert [s["id"] for s in state["slices"]] == [s["id"] for s in node.status()["slices"]]
    for entry in state["slices"]:
        assert entry["state"] == "free" and entry["isolation"] == "sim"
        assert entry["memory_total"] > 0 and entry["memory_used"] == 0
        assert entry["kernel_id"] is None and entry["lease"] is None and not entry["mine"]
    assert state["queue"] == [] and state["backend"] == "sim"
    assert isinstance(state["seq"], int) and state["seq"] >= 0
    with node.client() as client:
        assert state["pseudonym"] == client.watch_info()["pseudonym"]


async def test_requests_without_the_token_are_refused(jp_fetch: Fetch, node: BrokerProcess) -> None:
    kernel_id = await start_kernel(jp_fetch)
    no_token = {"Authorization": ""}
    for parts, method in (
        (("slices",), "GET"),
        (("kernels", kernel_id, "lease"), "GET"),
        (("kernels", kernel_id, "release"), "POST"),
    ):
        body = "{}" if method == "POST" else None
        with pytest.raises(HTTPClientError) as info:
            await jp_fetch("mig", "api", *parts, method=method, body=body, headers=no_token)
        assert info.value.code == 403, (parts, info.value.code)  # APIHandler: 403, no redirect
    assert len(tagged(node, kernel_id)) == 1  # the refused release did nothing


async def test_long_poll_answers_after_a_lease_change(jp_fetch: Fetch, node: BrokerProcess) -> None:
    first = await settled(jp_fetch)
    poll = asyncio.ensure_future(
        get_json(jp_fetch, "slices", params={"after": first["seq"], "timeout": 30})
    )
    await asyncio.sleep(0.5)
    assert not poll.done()  # nothing changed: the request waits

    started = time.monotonic()
    with node.client() as other:  # another client of the same user, outside the server
        lease = await asyncio.to_thread(other.acquire, "3g.40gb", wait=False)
        state = await asyncio.wait_for(poll, 10)
        assert time.monotonic() - started < 5
        assert state["seq"] > first["seq"]
        [held] = [s for s in state["slices"] if s["state"] == "leased"]
        assert held["id"] == lease["slice"]["id"] and held["mine"]
        assert held["lease"]["id"] == lease["id"] and held["kernel_id"] is None
        other.release(lease["id"])


async def test_long_poll_without_a_change_answers_at_its_timeout(
    jp_fetch: Fetch, node: BrokerProcess
) -> None:
    first = await settled(jp_fetch)
    started = time.monotonic()
    state = await get_json(jp_fetch, "slices", params={"after": first["seq"], "timeout": 1})
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 5, elapsed
    assert state["seq"] == first["seq"]
    assert [s["state"] for s in state["slices"]] == ["free"] * 3


async def test_bad_long_poll_parameters_are_400_naming_them(
    jp_fetch: Fetch, node: BrokerProcess
) -> None:
    for params, name in (
        ({"after": "abc"}, "after"),
        ({"after": "-1"}, "after"),
        ({"after": "1", "timeout": "soon"}, "timeout"),
        ({"after": "1", "timeout": "61"}, "timeout"),
        ({"after": "1", "timeout": "nan"}, "timeout"),
    ):
        code, body = await refused(jp_fetch, "slices", params=params)
        assert code == 400, params
        assert body["message"].startswith(f"{name} must be "), body
        assert repr(params[name]) in body["message"]


# ------------------------------------------------------------------------------ kernels
async def test_kernel_lease_release_and_reacquire(
    jp_fetch: Fetch, jp_serverapp: Any, node: BrokerProcess
) -> None:
    kernel_id = await start_kernel(jp_fetch)
    [lease] = tagged(node, kernel_id)

    response = await jp_fetch("mig", "api", "kernels", kernel_id, "lease")
    assert lease["key"] not in response.body.decode()  # the lease key never leaves the server
    view = json.loads(response.body)
    assert view["kernel_id"] == kernel_id and view["state"] == "leased"
    assert set(view["lease"]) == {"id", "created", "idle_timeout", "slice"}
    assert view["lease"]["id"] == lease["id"]
    assert view["lease"]["slice"] == {
        name: lease["slice"][name]
        for name in ("id", "uuid", "profile", "isolation", "memory_total")
    }
    assert view["slice"]["id"] == lease["slice"]["id"] and view["slice"]["state"] == "leased"
    assert view["slice"]["kernel_id"] == kernel_id
    assert view["slice"]["lease"]["expires_in"] > 0 and "idle_seconds" in view["slice"]
    assert view["queue"] is None

    state = await get_json(jp_fetch, "slices")
    owners = {s["id"]: s["kernel_id"] for s in state["slices"]}
    assert owners.pop(lease["slice"]["id"]) == kernel_id
    assert set(owners.values()) == {None}

    # Device data made before the release comes back in the kernel's next GPU cell.
    assert await run_cell(jp_serverapp, kernel_id, "%%gpufunc\ny = xp.arange(3.0)") == ""
    released = await get_json(jp_fetch, "kernels", kernel_id, "release", method="POST", body="{}")
    assert released["released"] == lease["id"]
    assert released["spilled"]["spilled"] == 1
    assert tagged(node, kernel_id) == []
    after = await get_json(jp_fetch, "kernels", kernel_id, "lease")
    assert after == {
        "kernel_id": kernel_id,
        "state": "none",
        "lease": None,
        "slice": None,
        "queue": None,
    }
    code, body = await refused(jp_fetch, "kernels", kernel_id, "release", method="POST", body="{}")
    assert (code, body["message"]) == (404, f"kernel {kernel_id} holds no GPU slice")

    out = await run_cell(jp_serverapp, kernel_id, "%%gpufunc --to-host\nz = y * 2\nprint(z)")
    assert "mig-kernel: slice re-acquired in " in out and "1 device object restored" in out
    assert "[0. 2. 4.]" in out
    again = await get_json(jp_fetch, "kernels", kernel_id, "lease")
    assert again["state"] == "leased" and again["lease"]["id"] != lease["id"]


async def test_a_waiting_kernel_is_queued_with_its_position(
    jp_fetch: Fetch, node: BrokerProcess
) -> None:
    kernel_id = await start_kernel(jp_fetch, "mig-lazy")
    assert (await get_json(jp_fetch, "kernels", kernel_id, "lease"))["state"] == "none"
    with node.client() as holder, node.client() as waiter:
        held = [holder.acquire("1g.10gb", wait=False) for _ in range(2)]  # both 1g.10gb slices
        granted: list[dict[str, Any]] = []

        def wait_for_slice() -> None:  # what the kernel's first GPU cell does
            with contextlib.suppress(AcquireCancelled, AcquireTimeout):
                granted.append(waiter.acquire("1g.10gb", tag=f"kernel:{kernel_id}", timeout=30))

        thread = threading.Thread(target=wait_for_slice)
        thread.start()
        try:
            view: dict[str, Any] = {}
            for _ in range(100):
                view = await get_json(jp_fetch, "kernels", kernel_id, "lease")
                if view["state"] == "queued":
                    break
                await asyncio.sleep(0.1)
            assert view["state"] == "queued", view
            assert view["queue"] == {"position": 1, "queue_length": 1}
            assert view["lease"] is None and view["slice"] is None
            [entry] = (await get_json(jp_fetch, "slices"))["queue"]
            assert entry["kernel_id"] == kernel_id and entry["mine"]

            holder.release(held[0]["id"])
            await asyncio.to_thread(thread.join, 30)
            [lease] = granted
            now = await get_json(jp_fetch, "kernels", kernel_id, "lease")
            assert now["state"] == "leased" and now["lease"]["id"] == lease["id"]
            waiter.release(lease["id"])
        finally:
            thread.join(35)


async def test_an_admin_releases_any_lease(jp_fetch: Fetch, node: BrokerProcess) -> None:
    """The server's user is the single-user broker's admin: it may end a lease of no kernel
    of this server, through ``POST leases/<id>/release``; ``slices`` says it is an admin."""
    with mig_kernel.client.BrokerClient(node.connection_file) as other:
        lease = other.acquire(wait=False)
        state = await get_json(jp_fetch, "slices")
        assert state["admin"] is True
        reply = await get_json(jp_fetch, "leases", lease["id"], "release", method="POST", body="{}")
        assert reply == {"released": lease["id"]}
        assert other.heartbeat([lease["id"]])[lease["id"]]["state"] == "ended"


async def test_a_non_admin_cannot_release_anothers_lease(
    jp_fetch: Fetch, make_broker: Callable[..., BrokerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker(layout=LAYOUT, multi_user=True)  # users as claimed; "admin" is admin
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    with broker.client("alice") as alice:
        lease = alice.acquire(wait=False)
        state = await get_json(jp_fetch, "slices")
        assert state["admin"] is False
        code, reply = await refused(
            jp_fetch, "leases", lease["id"], "release", method="POST", body="{}"
        )
        assert code == 403 and "belongs to another user" in reply["message"]
        assert alice.heartbeat([lease["id"]])[lease["id"]]["state"] == "active"
        alice.release(lease["id"])


async def test_unknown_kernel_is_404_json(jp_fetch: Fetch, node: BrokerProcess) -> None:
    for parts, method in ((("lease",), "GET"), (("release",), "POST")):
        body = "{}" if method == "POST" else None
        code, reply = await refused(
            jp_fetch, "kernels", "no-such-kernel", *parts, method=method, body=body
        )
        assert code == 404
        assert reply["message"] == "no kernel no-such-kernel on this server"


async def test_stopped_broker_is_503_json(jp_fetch: Fetch, node: BrokerProcess) -> None:
    kernel_id = await start_kernel(jp_fetch)
    first = await settled(jp_fetch)

    def poll(after: int) -> Awaitable[HTTPResponse]:
        params = {"after": after, "timeout": 60}
        return jp_fetch("mig", "api", "slices", params=params, raise_error=False)

    waiting = asyncio.ensure_future(poll(first["seq"]))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    assert await asyncio.to_thread(node.stop) == 0
    # A browser's long poll follows the stop (leases ending publish) and then learns the
    # broker is gone without waiting out its 60 s.
    response = await asyncio.wait_for(waiting, 10)
    while response.code == 200:
        response = await asyncio.wait_for(poll(json.loads(response.body)["seq"]), 10)
    body = json.loads(response.body)
    assert response.code == 503 and "no broker connection file" in body["message"], body
    started = time.monotonic()  # a poll begun while the broker is gone answers soon too
    assert (await asyncio.wait_for(poll(first["seq"]), 10)).code == 503
    assert time.monotonic() - started < 5
    for parts in (("slices",), ("kernels", kernel_id, "lease")):
        code, body = await refused(jp_fetch, *parts)
        assert code == 503 and body["code"] == "broker_unavailable"
        assert str(node.connection_file) in body["message"]


async def test_closing_stops_the_watch_thread_and_a_request_starts_it_again(
    jp_fetch: Fetch, jp_serverapp: Any, node: BrokerProcess
) -> None:
    # This server's own feed: an earlier test's server may still be ending its watch thread
    # (it notices its closed loop within a receive timeout), so threads are not counted.
    api = jp_serverapp.web_app.settings[server_extension.SETTINGS_KEY]
    assert api._feed is None  # nothing talks to the broker before the first request
    await get_json(jp_fetch, "slices")
    feed = api._feed
    assert feed is not None and feed.alive and feed._thread.name == "mig-kernel watch"
    api.close()
    assert api._feed is None and not feed.alive
    assert len((await get_json(jp_fetch, "slices"))["slices"]) == 3
    assert api._feed is not None and api._feed is not feed and api._feed.alive


# ------------------------------------------------------------------------ enabling it
def test_extension_points_are_found_without_heavy_imports() -> None:
    points = [{"module": "mig_kernel_rest"}]
    assert mig_kernel._jupyter_server_extension_points() == points
    assert mig_kernel_rest._jupyter_server_extension_points() == points
    code = (
        "import sys, mig_kernel, mig_kernel_rest; mig_kernel._jupyter_server_extension_points(); "
        "heavy = ('numpy', 'zmq', 'mig_kernel.jupyter', 'jupyter_server', "
        "'mig_kernel_rest.handlers'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_install_enables_the_extension_and_lab_passes_it(tmp_path: Path) -> None:
    config = REPO / "jupyter-config" / "jupyter_server_config.d" / "mig_kernel.json"
    assert json.loads(config.read_text()) == {
        "ServerApp": {"jpserver_extensions": {"mig_kernel": True}}
    }
    from jupyter_server.serverapp import ServerApp

    argv = jupyterlab_argv(tmp_path, LabOptions(open_browser=False))
    [flag] = [arg for arg in argv if arg.startswith("--ServerApp.jpserver_extensions")]
    app = ServerApp()
    app.parse_command_line([flag])
    assert app.jpserver_extensions == {"mig_kernel": True}


def test_mig_kernel_lab_serves_the_api(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    root.mkdir()
    lab = Lab(root, root / "state", ["--backend", "sim", "--sim-layout", LAYOUT])
    try:
        lab.start().wait_ready()
        state = wait_until(lambda: lab.get("/mig/api/slices"), 30, "GET /mig/api/slices")
        assert [s["profile"] for s in state["slices"]] == ["3g.40gb", "1g.10gb", "1g.10gb"]
        assert isinstance(state["seq"], int)
        assert lab.terminate() == 0
    finally:
        lab.kill()
