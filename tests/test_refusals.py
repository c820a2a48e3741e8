"""Errors a user understands (issue 11): a broker that refuses the user, or that cannot be
reached, never fails a kernel start (no HTTP 500) and never shows a traceback. The kernel starts
without a slice; ``%gpu status``, its first GPU cell and ``mig-kernel status`` name the cause in
one line. Real brokers, real kernels (jupyter_client and jupyter_server), real permissions."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mig_kernel.jupyter.kernelspec import kernel_json
from mig_kernel.testing import BrokerProcess, all_free, run_cli
from tests.support.kernels import Kernels
from tests.support.refusing_identity import REFUSAL

pytest_plugins = ["pytest_jupyter.jupyter_server"]

REPO = Path(__file__).resolve().parents[1]
LAYOUT = "H100-80GB:2x1g.10gb"
REFUSING = "--Broker.identity_provider_class=tests.support.refusing_identity.PolicyRefusedIdentity"
NO_SLICE = "GPU slice: none \u2014 "
Fetch = Callable[..., Awaitable[Any]]


@pytest.fixture
def kernels(tmp_path: Path) -> Iterator[Kernels]:
    """Kernelspecs in a temp dir; every kernel started from them is stopped at teardown."""
    made = Kernels(tmp_path / "kernels")
    yield made
    made.stop_all()


def as_another_user() -> list[str]:
    """The command prefix that makes a child subject to file permissions as another user is.

    Root ignores permissions, and the user ``nobody`` cannot run this interpreter where it lives
    under root's 0700 home; so as root the child runs without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (``setpriv``), and a file whose mode shuts out its owner shuts it out
    too. Any other user is subject to permissions already: no prefix."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to run a child without root's permission bypass")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop root's permission bypass here: {probe.stderr.strip()}")
    return prefix


def status_as_another_user(connection_file: Path) -> subprocess.CompletedProcess[str]:
    """``mig-kernel status`` as ``run_cli`` runs it, subject to file permissions."""
    return subprocess.run(
        [*as_another_user(), sys.executable, "-m", "mig_kernel", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, JUPYTER_CONFIG_PATH="", MIG_KERNEL_BROKER=str(connection_file)),
    )


def status_as_nobody(connection_file: Path) -> subprocess.CompletedProcess[str]:
    """``mig-kernel status`` as the OS user ``nobody`` (root only; skipped where ``nobody``
    cannot run this interpreter, e.g. one under root's 0700 home)."""
    import pwd

    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    try:
        account = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this system has no user nobody")
    run = functools.partial(
        subprocess.run,
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "HOME": account.pw_dir,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "JUPYTER_CONFIG_PATH": "",
            "MIG_KERNEL_BROKER": str(connection_file),
        },
    )
    probe = run([sys.executable, "-c", "import mig_kernel.cli"])
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"user nobody cannot run this interpreter: {last}")
    return run([sys.executable, "-m", "mig_kernel", "status"])


def status_of(connection_file: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("status", env={"MIG_KERNEL_BROKER": str(connection_file)})


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed ``mig-kernel status`` prints (no traceback, exit status 1)."""
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mig-kernel status: error: ")
    return lines[0]


def socket_dir(broker: BrokerProcess) -> Path:
    endpoint = json.loads(broker.connection_file.read_text())["endpoint"]
    assert endpoint.startswith("ipc://")
    return Path(endpoint.removeprefix("ipc://")).parent


def owner_name(path: Path) -> str:
    import pwd

    return pwd.getpwuid(path.stat().st_uid).pw_name


# -- mig-kernel status -------------------------------------------------------------------------
def test_status_of_a_killed_broker_says_it_is_not_running(make_broker) -> None:
    broker = make_broker(layout=LAYOUT)
    pid = json.loads(broker.connection_file.read_text())["pid"]
    broker.kill()  # SIGKILL: broker.json and the socket file stay behind, nothing listens
    try:
        started = time.monotonic()
        line = one_error_line(status_of(broker.connection_file))
        elapsed = time.monotonic() - started
    finally:
        broker.start()  # its executors outlived it: the restarted broker stops them at teardown
    assert "the broker is not running (nothing listens on " in line
    assert f"{broker.connection_file} of pid {pid} is stale" in line
    assert f"start it with `mig-kernel broker --state-dir {broker.state_dir}`" in line
    assert elapsed < 8.0  # said at once, not after the client's 10 s time limit


def test_status_of_another_users_broker_says_permission_denied(make_broker) -> None:
    as_another_user()  # skips before a broker is started for nothing
    broker = make_broker(layout=LAYOUT)
    sockets = socket_dir(broker)
    mode = stat.S_IMODE(sockets.stat().st_mode)
    sockets.chmod(0)  # as another user's 0700 directory is to us: broker.json stays readable
    try:
        line = one_error_line(status_as_another_user(broker.connection_file))
    finally:
        sockets.chmod(mode)
    assert f"permission denied on {sockets} (owner {owner_name(sockets)}, mode 0000)" in line
    assert "serves only its own user" in line and "start your own with `mig-kernel broker`" in line
    assert "no answer" not in line  # not the time limit ZeroMQ alone would run into
    assert broker.status()["slices"]  # the broker itself is unharmed


def test_status_as_another_os_user_names_the_directory_that_refuses(make_broker) -> None:
    """A real second uid (``nobody``) with a readable copy of broker.json: the broker's
    private socket directory is what keeps it out, and the message names the first directory
    on the way that does."""
    broker = make_broker(layout=LAYOUT)
    public = Path(tempfile.mkdtemp(prefix="mkt-refusal-"))
    try:
        public.chmod(0o755)
        copy = public / "broker.json"
        shutil.copy(broker.connection_file, copy)
        copy.chmod(0o644)
        line = one_error_line(status_as_nobody(copy))
    finally:
        shutil.rmtree(public)
    denied = re.search(r"permission denied on (/\S*) \(owner ", line)
    assert denied is not None, line
    assert (socket_dir(broker) / "broker.sock").is_relative_to(denied.group(1))
    assert f"the broker of {copy} (pid " in line and "serves only its own user" in line


def test_status_with_an_unreadable_connection_file_says_whose_it_is(tmp_path: Path) -> None:
    connection_file = tmp_path / "broker.json"
    connection_file.write_text("{}")
    connection_file.chmod(0)
    line = one_error_line(status_as_another_user(connection_file))
    owner = owner_name(connection_file)
    assert f"permission denied reading {connection_file} (owner {owner}, mode 0000)" in line
    assert "MIG_KERNEL_BROKER=/run/mig-kernel/broker.json" in line


def test_status_of_a_broker_that_refuses_the_user_is_one_line(make_broker) -> None:
    broker = make_broker(REFUSING, layout=LAYOUT, wait=False)  # nobody may even see its status
    line = one_error_line(status_of(broker.connection_file))
    assert line == f"mig-kernel status: error: {REFUSAL}"


# -- kernels ------------------------------------------------------------------------------------
def test_kernel_of_a_stopped_broker_starts_and_says_why(
    make_broker, kernels: Kernels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker(layout=LAYOUT)
    stale = tmp_path / "stale-broker.json"
    shutil.copy(broker.connection_file, stale)
    assert broker.stop() == 0  # a clean stop: the copy now names a pid and socket that are gone
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(stale))
    kernel = kernels.start(kernels.spec("mig-1g", "1g.10gb"))  # eager: leases at start

    told = kernel.run("import os\nprint(os.environ['MIG_KERNEL_NO_SLICE_REASON'])")
    assert told.stdout.startswith("the broker is not running (")  # from the provisioner
    status = kernel.run("%gpu status")
    assert status.status == "ok"
    first, second = status.stdout.splitlines()
    assert first.startswith(NO_SLICE + "the broker is not running (")
    assert f"{stale} of pid " in first and "is stale" in first
    assert "asks the broker again" in second

    cell = kernel.run("%%gpufunc\nx = 1")
    assert cell.status == "error" and cell.error is not None
    assert cell.error["ename"] == "BrokerUnavailable"
    shown = cell.error["traceback"]
    assert 1 <= len(shown) <= 3, shown  # the cause, not the client's frames
    assert shown[0].startswith("BrokerUnavailable: the broker is not running")
    assert "client.py" not in cell.traceback


def test_kernel_refused_by_the_broker_starts_and_says_why(
    make_broker, kernels: Kernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker(REFUSING, layout=LAYOUT, wait=False)
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    kernel = kernels.start(kernels.spec("mig-any"))
    status = kernel.run("%gpu status")
    assert status.stdout.splitlines()[0] == NO_SLICE + REFUSAL
    acquire = kernel.run("%gpu acquire")
    assert acquire.error is not None and acquire.error["ename"] == "NotPermitted"
    assert acquire.error["traceback"][0] == f"NotPermitted: {REFUSAL}"


def test_kernel_of_a_profile_the_node_lacks_starts_and_says_why(
    make_broker, kernels: Kernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decision (docs/architecture.md): a kernelspec naming a profile the node does not offer
    (a stale spec, a layout changed by an admin) starts without a slice, as any other refusal
    does, instead of failing the start."""
    broker = make_broker(layout=LAYOUT)
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    kernel = kernels.start(kernels.spec("mig-7g", "7g.80gb"))
    status = kernel.run("%gpu status")
    first = status.stdout.splitlines()[0]
    assert first.startswith(NO_SLICE) and "7g.80gb" in first and "1g.10gb" in first
    cell = kernel.run("%%gpufunc\nx = 1")
    assert cell.error is not None and cell.error["ename"] == "UnknownProfileError"
    assert len(cell.error["traceback"]) <= 3 and "7g.80gb" in cell.error["traceback"][0]
    with broker.client() as client:
        assert client.leases(tag=kernel.tag) == []


KERNEL_AS_ANOTHER_USER = """
import json, sys
from pathlib import Path
from tests.support.kernels import Kernels

kernels = Kernels(Path(sys.argv[1]))
try:
    kernel = kernels.start(kernels.spec("mig-1g", "1g.10gb"))
    print(json.dumps({"status": kernel.run("%gpu status").stdout}))
finally:
    kernels.stop_all()
"""


def test_kernel_of_another_user_starts_and_says_permission_denied(
    make_broker, tmp_path: Path
) -> None:
    """The issue's case: a user's kernel against a broker that serves another user. The
    provisioner, the kernel and its cell all run subject to the socket directory's mode."""
    prefix = as_another_user()
    broker = make_broker(layout=LAYOUT)
    sockets = socket_dir(broker)
    mode = stat.S_IMODE(sockets.stat().st_mode)
    env = dict(
        os.environ,
        MIG_KERNEL_BROKER=str(broker.connection_file),
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTER_CONFIG_PATH="",
    )
    sockets.chmod(0)
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-c", KERNEL_AS_ANOTHER_USER, str(tmp_path / "kernels")],
            capture_output=True,
            text=True,
            timeout=100,
            env=env,
            cwd=REPO,
        )
    finally:
        sockets.chmod(mode)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout.splitlines()[-1])["status"]
    first = status.splitlines()[0]
    assert first.startswith(NO_SLICE + f"permission denied on {sockets} ")
    assert "serves only its own user" in first
    assert all_free(broker.status())  # nothing was leased for it


# -- jupyter_server -----------------------------------------------------------------------------
async def test_server_starts_a_refused_kernel_instead_of_answering_500(
    jp_fetch: Fetch,
    jp_serverapp: Any,
    jp_data_dir: Path,
    make_broker: Callable[..., BrokerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = make_broker(REFUSING, layout=LAYOUT, wait=False)
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    spec_dir = jp_data_dir / "kernels" / "mig-python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json(None, "GPU slice (any)")))

    response = await jp_fetch(
        "api", "kernels", method="POST", body=json.dumps({"name": "mig-python3"})
    )
    assert response.code == 201
    kernel_id = json.loads(response.body)["id"]
    manager = jp_serverapp.kernel_manager.get_kernel(kernel_id)
    assert manager.provisioner.no_slice_reason == REFUSAL
    assert manager.provisioner.lease_id is None
    assert manager.provisioner.process.poll() is None  # the kernel runs, without a slice
    deleted = await jp_fetch("api", "kernels", kernel_id, method="DELETE")
    assert deleted.code == 204
