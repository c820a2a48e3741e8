"""Two real OS users on one ``--multi-user`` broker (sim slices): each is who the kernel says,
each executor runs as its holder, and nothing of one reaches the other.

Needs root (creating users with useradd, a broker that switches executors to them); CI runs
as root. Each user is driven by a real process of that user (tests/support/tenant.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mig_kernel.testing import BrokerProcess, all_free

from .support.accounts import PYTHONPATH, USERS, ensure_users
from .test_gpu import REASON as GPU_REASON
from .test_gpu import record

LAYOUT = "H100-80GB:4x1g.10gb"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates OS users and runs a multi-user broker"
)


@pytest.fixture(scope="module")
def os_users() -> dict[str, Any]:
    return ensure_users()


@contextlib.contextmanager
def multi_user_node(*args: str, timeout: float = 60) -> Iterator[dict[str, Any]]:
    """A multi-user broker whose runtime dir every user can reach (pytest's tmp dirs are
    private to root); stopped and its directory removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="mkt-node-"))
    base.chmod(0o755)
    broker = BrokerProcess(
        base / "state",
        ["--multi-user", "--runtime-dir", str(base / "run"), *args],
        connection_file=base / "run" / "broker.json",
    )
    try:
        broker.start()
        status = broker.wait_for(all_free, timeout=timeout)
        yield {"base": base, "broker": broker, "status": status}
    finally:
        broker.stop()
        if os.environ.get("MIG_KERNEL_GPU_RECORD"):  # the executors' logs, for the record
            logs = Path(os.environ["MIG_KERNEL_GPU_RECORD"]) / "multi-user-logs"
            shutil.copytree(base / "state" / "logs", logs, dirs_exist_ok=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def node() -> Iterator[dict[str, Any]]:
    with multi_user_node(
        "--backend", "sim", "--sim-layout", LAYOUT, "--per-user-limit", "2"
    ) as started:
        yield started


class Driven:
    """One tenant process of one OS user, answering JSON commands."""

    def __init__(self, account: Any, connection_file: Path) -> None:
        self.account = account
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.tenant", str(connection_file)],
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            cwd="/",
            env={
                "PYTHONPATH": PYTHONPATH,
                "HOME": account.pw_dir,
                "USER": account.pw_name,
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            },
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def __call__(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"tenant {self.account.pw_name} died (exit {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def tenants(os_users: dict[str, Any], node: dict[str, Any]) -> Iterator[dict[str, Driven]]:
    connection_file = node["broker"].connection_file
    driven = {name: Driven(os_users[name], connection_file) for name in USERS}
    try:
        yield driven
    finally:
        for tenant in driven.values():
            tenant.close()


def test_each_user_leases_their_own_slice_and_runs_as_themselves(
    os_users: dict[str, Any], node: dict[str, Any], tenants: dict[str, Driven]
) -> None:
    alice, bob = (tenants[name] for name in USERS)
    a, b = alice("connect"), bob("connect")
    assert a["user"] == USERS[0] and b["user"] == USERS[1]
    assert a["slice"] != b["slice"]
    for name, tenant in tenants.items():
        account = os_users[name]
        me = tenant("whoami")
        assert me["uid"] == me["euid"] == account.pw_uid
        assert me["resuid"] == [account.pw_uid] * 3  # no saved uid to switch back to
        assert me["gid"] == account.pw_gid
        assert me["home"] == account.pw_dir and me["cwd"] == account.pw_dir
        assert "MIG_KERNEL_LOCK_DIR" not in me["env"]  # the broker's environment stays its own
    status = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mig_kernel",
                "status",
                "--json",
                "--broker",
                str(node["broker"].connection_file),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    holders = {s["holder"] for s in status["slices"] if s["state"] == "leased"}
    assert holders == set(USERS)  # root is an admin: it sees names


def test_files_of_the_broker_and_of_the_other_user_are_out_of_reach(
    os_users: dict[str, Any], node: dict[str, Any], tenants: dict[str, Driven]
) -> None:
    alice, bob = (tenants[name] for name in USERS)
    alice("connect")
    bob("connect")
    state = node["base"] / "state"
    secret = Path(os_users[USERS[0]].pw_dir) / "private.txt"
    secret.write_text("alice only")
    os.chown(secret, os_users[USERS[0]].pw_uid, os_users[USERS[0]].pw_gid)
    secret.chmod(0o600)
    segments = alice("put")["segments"]
    assert segments, "alice's array should sit in an arena segment"
    own = [str(secret), *segments]
    assert alice("probe", paths=own) == {path: "readable" for path in own}  # the control
    suspended = alice("suspend")
    assert suspended["spilled"] == 1
    spill = node["base"] / "state-spill" / USERS[0]
    spilled_files = [str(p) for p in spill.rglob("*") if p.is_file()]
    assert spilled_files and all(
        Path(p).stat().st_uid == os_users[USERS[0]].pw_uid for p in spilled_files
    )
    targets = [
        str(state),
        str(state / "broker.sqlite"),
        str(state / "broker.sqlite-wal"),
        str(state / "logs"),
        str(node["base"] / "state-spill"),
        str(spill),
        *spilled_files,
        *segments,
        str(secret),
    ]
    seen = bob("probe", paths=targets)
    assert seen == {path: "PermissionError" for path in targets}
    for name in ("broker.sqlite", "broker.lock"):
        assert (state / name).stat().st_mode & 0o077 == 0


def test_another_users_lease_cannot_be_released_inspected_attached_or_reached(
    os_users: dict[str, Any], node: dict[str, Any], tenants: dict[str, Driven]
) -> None:
    alice, bob = (tenants[name] for name in USERS)
    a = alice("connect", tag="kernel:alice-1")
    bob("connect")
    lease = a["lease"]
    assert bob("broker", request="release", lease_id=lease)["error"] == "NotPermitted"
    assert bob("broker", request="lease", lease_id=lease)["error"] == "NotPermitted"
    assert bob("broker", request="drain", slice_id=a["slice"])["error"] == "NotPermitted"
    assert bob("attach", tag="kernel:alice-1") == {"attached": None}
    socket_path = a["endpoint"].removeprefix("ipc://")
    assert Path(socket_path).stat().st_uid == os_users[USERS[0]].pw_uid
    reach = bob("unix_connect", path=socket_path)
    assert reach["connected"] is False and reach["why"] == "PermissionError"
    # Alice's session credentials in Bob's hands are refused: the kernel says who connects.
    stolen = bob("with_credentials", client_id=a["client_id"], client_key=a["client_key"])
    assert stolen["error"] == "AuthenticationError" and "another user" in stolen["message"]
    assert alice("whoami")["uid"] == os_users[USERS[0]].pw_uid  # alice is unaffected
    status = bob("broker", request="status")
    held = [s for s in status["slices"] if s["state"] == "leased"]
    others = [s for s in held if not s["mine"]]
    assert others and all(s["holder"].startswith("user-") and s["lease"] is None for s in others)


def test_a_tampered_executor_never_serves_the_next_user(os_users: dict[str, Any]) -> None:
    with multi_user_node("--backend", "sim", "--sim-layout", "H100-80GB:1g.10gb") as started:
        connection_file = started["broker"].connection_file
        alice = Driven(os_users[USERS[0]], connection_file)
        bob = Driven(os_users[USERS[1]], connection_file)
        try:
            alice("connect")
            tampered = alice("tamper")
            assert tampered["tampered"] is True  # her code did rewrite its executor
            alice("release")
            got = bob("connect")  # the node's only slice, once it is free again
            assert got.get("user") == USERS[1], got
            me = bob("whoami")
            assert me["uid"] == os_users[USERS[1]].pw_uid  # a fresh executor, as bob
            assert bob("gpu")["module"] == "numpy"
        finally:
            alice.close()
            bob.close()


def test_a_hello_claiming_another_user_is_still_the_callers_uid(
    os_users: dict[str, Any], node: dict[str, Any], tenants: dict[str, Driven]
) -> None:
    bob = tenants[USERS[1]]
    assert bob("hello", claim=USERS[0]) == {"user": USERS[1], "admin": False}
    assert bob("hello", claim="root") == {"user": USERS[1], "admin": False}


def test_policy_refuses_a_user_who_is_not_allowed(os_users: dict[str, Any]) -> None:
    with multi_user_node(
        "--backend",
        "sim",
        "--sim-layout",
        LAYOUT,
        f"--LeasePolicy.allowed_users={USERS[0]}",
        "--LeasePolicy.allowed_profiles={'*': ['2g.20gb']}",
    ) as started:
        alice = Driven(os_users[USERS[0]], started["broker"].connection_file)
        bob = Driven(os_users[USERS[1]], started["broker"].connection_file)
        try:
            refused = bob("hello")
            assert refused["error"] == "NotPermitted"
            assert "not allowed" in refused["message"] and USERS[1] in refused["message"]
            denied = alice("connect")
            assert denied["error"] == "NotPermitted"
            assert "allowed profiles: 2g.20gb" in denied["message"]
        finally:
            alice.close()
            bob.close()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=str(GPU_REASON))
def test_two_users_share_the_gpu_in_process_slices(os_users: dict[str, Any]) -> None:
    """On a real GPU (MIG off): two `process` slices of one card, each executor switched to its
    holder after warming CuPy as root; each computes on the GPU as its own uid."""
    with multi_user_node("--backend", "nvml", "--share", "2", timeout=180) as started:
        record("multi-user-status.json", started["status"])
        assert {s["isolation"] for s in started["status"]["slices"]} == {"process"}
        connection_file = started["broker"].connection_file
        driven = {name: Driven(os_users[name], connection_file) for name in USERS}
        try:
            seen: dict[str, Any] = {}
            for name, tenant in driven.items():
                lease = tenant("connect")
                assert lease.get("user") == name, lease
                seen[name] = {"lease": lease["slice"], "whoami": tenant("whoami")}
                seen[name]["gpu"] = tenant("gpu")
                seen[name]["segments"] = tenant("put")["segments"]
            record("multi-user-gpu.json", seen)
            alice, bob = (seen[name] for name in USERS)
            assert alice["lease"] != bob["lease"]
            for name in USERS:
                assert seen[name]["whoami"]["resuid"] == [os_users[name].pw_uid] * 3
                gpu = seen[name]["gpu"]
                assert gpu.get("module") == "cupy" and gpu["sum"] == gpu["expected"], gpu
                assert gpu["visible"].startswith("GPU-")
                # its kernels compile into its own cache, not the broker's HOME
                assert gpu["kernel_cache"].startswith(os_users[name].pw_dir + "/")
                assert gpu["cached_kernels"] > 0
            state = started["base"] / "state"
            targets = [str(state / "broker.sqlite"), *alice["segments"]]
            seen["bob_probes"] = driven[USERS[1]]("probe", paths=targets)
            record("multi-user-gpu.json", seen)
            assert seen["bob_probes"] == {path: "PermissionError" for path in targets}
        finally:
            for tenant in driven.values():
                tenant.close()
