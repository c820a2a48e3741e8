"""A real JupyterHub (PyPI) with configurable-http-proxy (npm) in front of a multi-user broker:
hub users log in with the hub's form, start servers, start mig kernels through the servers'
REST API and run GPU cells over the kernels' websockets.

1. LocalProcessSpawner: hub users are OS users; each executor runs as its user's uid.
2. SimpleLocalProcessSpawner: hub users share the hub's OS user; the broker knows them by their
   servers' hub tokens, refuses revoked and forged ones, and gives their executors uids of
   their own.
3. Stopping a server through the hub releases its user's slice; admins see names.

Needs root (OS users, servers as other users, a multi-user broker) and configurable-http-proxy
on PATH (.ci/run installs it with npm).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mig_kernel.client import BrokerClient
from mig_kernel.testing import BrokerProcess, run_cli, wait_until
from mig_kernel.wire import errors as E

from .support.accounts import USERS, ensure_users
from .support.hub import Hub, HubUser
from .test_gpu import REASON as GPU_REASON
from .test_gpu import record

LAYOUT = "H100-80GB:4x1g.10gb"
BROKER_CONFIG = Path(__file__).resolve().parents[1] / "share/jupyterhub/mig_kernel_config.py"
GPU_CELL = '%%gpufunc\nprint("executor uid", __import__("os").getuid())'

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: OS users and their servers"),
    pytest.mark.skipif(
        shutil.which("configurable-http-proxy") is None,
        reason="configurable-http-proxy is not installed (npm install -g configurable-http-proxy)",
    ),
]


@contextlib.contextmanager
def hub_node(
    spawner: str,
    admins: str = "",
    slices: tuple[str, ...] = ("--backend", "sim", "--sim-layout", LAYOUT),
) -> Iterator[dict[str, Any]]:
    """A multi-user broker configured by share/jupyterhub/mig_kernel_config.py and a hub
    configured by share/jupyterhub/jupyterhub_config.py, the files of the deployment guide;
    ``slices``: the broker's backend options (sim by default, ``nvml`` on a GPU)."""
    base = Path(tempfile.mkdtemp(prefix="mkt-hub-"))
    base.chmod(0o755)
    token_file = base / "hub-service-token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    (base / "hub").mkdir()
    hub = Hub(base / "hub", {})
    shared = {"MIG_HUB_SHARED_USER": "root"} if spawner == "shared" else {}
    broker_env = {
        "MIG_HUB_TOKEN_FILE": str(token_file),
        "MIG_HUB_API_URL": hub.api,
        "MIG_HUB_HOMES": str(base / "homes"),
        **shared,
    }
    broker = BrokerProcess(
        base / "state",
        [
            *slices,
            "--runtime-dir",
            str(base / "run"),
            "--per-user-limit",
            "1",
        ],
        connection_file=base / "run" / "broker.json",
        env=broker_env,
    )
    config_dir = base / "jupyter-config"  # BrokerProcess's JUPYTER_CONFIG_DIR
    config_dir.mkdir()
    shutil.copy(BROKER_CONFIG, config_dir / "mig_kernel_config.py")
    try:
        broker.start()  # (its status needs a hub token from this shared-uid process)
        installed = run_cli(
            "install-kernelspec",
            "--multi-user",
            "--broker",
            str(broker.connection_file),
            "--prefix",
            str(base / "kernels"),
        )
        assert installed.returncode == 0, installed.stderr
        hub.env.update(
            MIG_HUB_SPAWNER=spawner,
            MIG_HUB_BROKER=str(broker.connection_file),
            MIG_HUB_TOKEN_FILE=str(token_file),
            MIG_HUB_ADMINS=admins,
            MIG_HUB_JUPYTER_PATH=str(base / "kernels" / "share" / "jupyter"),
        )
        hub.start()
        yield {"base": base, "broker": broker, "hub": hub}
    finally:
        hub.stop()
        broker.stop()
        shutil.rmtree(base, ignore_errors=True)


def run_gpu_cell(user: HubUser, code: str = GPU_CELL) -> tuple[str, int]:
    """Start the user's server and a mig kernel, run a GPU cell: (kernel id, executor uid)."""
    user.start_server()
    kernel = user.start_kernel()
    result = user.execute(kernel, code)
    assert result["reply"] == "ok", result
    line = next(x for x in result["stdout"].splitlines() if x.startswith("executor uid"))
    return kernel, int(line.split()[-1])


def my_slices(user: HubUser) -> dict[str, Any]:
    """The user's view through their server's REST API (the JupyterLab panel's source)."""
    answer = user.rest("GET", "/mig/api/slices")
    assert answer.status_code == 200, answer.text
    return answer.json()


def leased(view: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in view["slices"] if s["state"] == "leased"]


def test_hub_users_who_are_os_users_get_their_own_slices_and_uids() -> None:
    accounts = ensure_users()
    with hub_node("local") as node:
        hub: Hub = node["hub"]
        alice, bob = (hub.login(name) for name in USERS)
        _, alice_uid = run_gpu_cell(alice)
        _, bob_uid = run_gpu_cell(bob)
        assert alice_uid == accounts[USERS[0]].pw_uid and bob_uid == accounts[USERS[1]].pw_uid
        views = {user.name: my_slices(user) for user in (alice, bob)}
        for user in (alice, bob):
            mine = [s for s in leased(views[user.name]) if s["mine"]]
            theirs = [s for s in leased(views[user.name]) if not s["mine"]]
            assert len(mine) == 1 and mine[0]["holder"] == user.name
            assert len(theirs) == 1 and theirs[0]["holder"].startswith("user-")
            assert theirs[0]["lease"] is None
        ids = {s["id"] for view in views.values() for s in leased(view) if s["mine"]}
        assert len(ids) == 2  # different slices


@pytest.mark.gpu
@pytest.mark.timeout(600)  # two servers, kernels and CuPy-warmed executors on a real card
@pytest.mark.skipif(GPU_REASON is not None, reason=str(GPU_REASON))
def test_hub_users_who_are_os_users_share_a_real_gpu_in_process_slices() -> None:
    """Scenario 1 on a real GPU (MIG off): two `process` slices of one card; each hub user's
    GPU cell computes with CuPy on it, in an executor running as that user's uid."""
    accounts = ensure_users()
    code = (
        "%%gpufunc\nimport os, cupy\n"
        "total = int(cupy.arange(1 << 20, dtype=cupy.int64).sum())\n"
        'print("device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())\n'
        'print("sum", total, "uid", os.getuid())\n'
        'print("executor uid", os.getuid())'
    )
    with hub_node("local", slices=("--backend", "nvml", "--share", "2")) as node:
        hub: Hub = node["hub"]
        alice, bob = (hub.login(name) for name in USERS)
        seen: dict[str, Any] = {}
        for user in (alice, bob):
            user.start_server()
            kernel = user.start_kernel()
            result = user.execute(kernel, code, timeout=300)
            seen[user.name] = {"result": result}
            record("hub-gpu.json", seen)
            assert result["reply"] == "ok", result
        for user in (alice, bob):
            seen[user.name]["view"] = my_slices(user)
        record("hub-gpu.json", seen)
        for user in (alice, bob):
            out = seen[user.name]["result"]["stdout"]
            assert f"sum {(1 << 20) * ((1 << 20) - 1) // 2} uid {accounts[user.name].pw_uid}" in out
            assert "executor uid" in out and "device NVIDIA" in out, out
            mine = [s for s in leased(seen[user.name]["view"]) if s["mine"]]
            theirs = [s for s in leased(seen[user.name]["view"]) if not s["mine"]]
            assert len(mine) == 1 and mine[0]["isolation"] == "process"
            assert len(theirs) == 1 and theirs[0]["holder"].startswith("user-")
        views = [seen[u.name]["view"] for u in (alice, bob)]
        assert len({s["id"] for view in views for s in leased(view) if s["mine"]}) == 2


def test_hub_users_sharing_an_os_user_are_told_apart_by_their_tokens() -> None:
    ensure_users()  # the executor uids need nothing from /etc/passwd, the servers run as root
    with hub_node("shared", admins="hubadmin") as node:
        hub: Hub = node["hub"]
        alice, bob = hub.login("hubalice"), hub.login("hubbob")
        alice_kernel, alice_uid = run_gpu_cell(alice)
        bob_kernel, bob_uid = run_gpu_cell(bob)
        # Executors of their own: never root (the servers' uid), never each other's.
        assert 61000 <= alice_uid <= 61999 and 61000 <= bob_uid <= 61999
        assert alice_uid != bob_uid
        # ... and bob's code on his slice cannot look into alice's executor's home.
        alice_home = node["base"] / "homes" / f"uid-{alice_uid}"
        assert alice_home.is_dir() and alice_home.stat().st_uid == alice_uid
        probe = bob.execute(
            bob_kernel,
            f"%%gpufunc\ntry:\n    __import__('os').listdir({str(alice_home)!r})\n"
            f"    print('READ')\nexcept PermissionError:\n    print('DENIED')",
        )
        assert probe["stdout"].strip() == "DENIED", probe
        # Each holds one slice although the limit is one per user: two identities, not one.
        for user in (alice, bob):
            view = my_slices(user)
            mine = [s for s in leased(view) if s["mine"]]
            assert [s["holder"] for s in mine] == [f"hub:{user.name}"]
            assert all(s["holder"].startswith("user-") for s in leased(view) if not s["mine"])
        # A revoked token and a forged one are refused, and nothing is granted to them.
        revoked = hub.login("hubalice", note="to be revoked").token
        tokens = alice.api("GET", "/users/hubalice/tokens").json()["api_tokens"]
        token_id = next(t["id"] for t in tokens if t["note"] == "to be revoked")
        assert alice.api("DELETE", f"/users/hubalice/tokens/{token_id}").status_code == 204
        for token in (revoked, "forged-" + secrets.token_hex(16)):
            with pytest.raises(E.AuthenticationError, match="does not accept this token"):
                hub_client(node, token)
        admin = hub_client(node, hub.login("hubadmin").token)
        try:
            assert admin.session["admin"] and admin.session["user"] == "hub:hubadmin"
            holders = sorted(s["holder"] for s in leased(admin.status()))
            assert holders == ["hub:hubalice", "hub:hubbob"]  # an admin sees names
            # 3. Stopping a server through the hub releases its user's slice.
            alice.stop_server()
            wait_until(
                lambda: [s["holder"] for s in leased(admin.status())] == ["hub:hubbob"],
                timeout=30,
                what="hubalice's slice released after her server stopped",
            )
        finally:
            admin.close()
        assert alice_kernel  # the kernel that held it is gone with the server


def hub_client(node: dict[str, Any], token: str) -> BrokerClient:
    """A session of this (root, shared-uid) process presenting ``token``, as a kernel would
    (a kernel takes it from JUPYTERHUB_API_TOKEN; here it is given, so threads can differ)."""
    return BrokerClient(node["broker"].connection_file, claims={"hub_token": token})


def test_the_guides_files_are_the_ones_tested() -> None:
    guide = (Path(__file__).resolve().parents[1] / "docs" / "deploy-jupyterhub.md").read_text()
    for path in ("share/jupyterhub/jupyterhub_config.py", "share/jupyterhub/mig_kernel_config.py"):
        text = (Path(__file__).resolve().parents[1] / path).read_text()
        assert text.strip() in guide, f"docs/deploy-jupyterhub.md must show {path} as it is"


def test_a_hub_that_does_not_answer_stalls_no_one_else() -> None:
    """The hub stopped (SIGSTOP) while a kernel's new token waits for it: the broker answers
    everyone else meanwhile (the check runs on a worker thread), and the waiting hello gets
    one line saying the hub did not answer."""
    import signal
    import threading

    ensure_users()
    with hub_node("shared", admins="hubadmin") as node:
        hub: Hub = node["hub"]
        admin_token = hub.login("hubadmin").token
        fresh_token = hub.login("hubalice").token
        hub_client(node, admin_token).close()  # verified once: now cached
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGSTOP)
        outcome: dict[str, Any] = {}

        def sign_in() -> None:
            try:
                hub_client(node, fresh_token).close()
                outcome["result"] = "signed in"
            except E.AuthenticationError as exc:
                outcome["result"] = str(exc)

        waiting = threading.Thread(target=sign_in)
        try:
            waiting.start()
            admin = hub_client(node, admin_token)  # cached: answered while the other waits
            try:
                assert admin.session["user"] == "hub:hubadmin"
                assert admin.status()["slices"]
                assert waiting.is_alive()  # the hub still has not answered the other hello
            finally:
                admin.close()
            waiting.join(30)
            assert "did not answer" in outcome["result"]
        finally:
            hub.proc.send_signal(signal.SIGCONT)
            waiting.join(30)
