"""Runtime paths a broker cannot be tricked with, and one broker per GPU node-wide."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mig_kernel.testing import BrokerProcess
from mig_kernel.wire.connection import runtime_dir_for
from mig_kernel.wire.paths import UnsafePath, secure_dir

NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to give a directory to another user"
)


def start_broker(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A broker that is expected to refuse to start (it would otherwise run: 20 s limit)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mig_kernel",
            "broker",
            "--backend",
            "sim",
            "--state-dir",
            str(state_dir),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "MIG_KERNEL_LOCK_DIR": str(state_dir.parent / "locks")},
    )


def test_a_symlink_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    planted = tmp_path / "run"
    planted.symlink_to(target)
    with pytest.raises(UnsafePath, match=r"run: it is a symlink .*remove it"):
        secure_dir(planted, 0o700)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_modes_are_corrected_through_the_descriptor(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    assert stat.S_IMODE(secure_dir(loose, 0o700).stat().st_mode) == 0o700
    assert stat.S_IMODE(secure_dir(tmp_path / "public", 0o755).stat().st_mode) == 0o755


def test_a_parent_anyone_may_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafePath, match="writable by every user and not sticky"):
        secure_dir(shared / "run")
    shared.chmod(0o1777)  # as /tmp: entries can only be replaced by their owner
    assert secure_dir(shared / "run").is_dir()


@needs_root
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=r"belongs to 'nobody' \(uid 65534\)"):
        secure_dir(theirs)
    assert theirs.stat().st_uid == NOBODY and stat.S_IMODE(theirs.stat().st_mode) == 0o700


def test_without_xdg_runtime_dir_sockets_live_in_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    state = tmp_path / "s"
    assert runtime_dir_for(state) == state / "run"
    deep = tmp_path / ("x" * 90)  # too long for an ipc path: the broker makes a random one
    assert runtime_dir_for(deep) is None


def test_broker_refuses_a_planted_runtime_dir_with_one_line(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.mkdir()
    target.chmod(0o755)
    (tmp_path / "run").symlink_to(target)
    result = start_broker(tmp_path / "state", "--runtime-dir", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "it is a symlink" in result.stderr and "Traceback" not in result.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and not any(target.iterdir())


@needs_root
def test_broker_refuses_a_runtime_dir_of_another_user(tmp_path: Path) -> None:
    theirs = tmp_path / "run"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    result = start_broker(tmp_path / "state", "--runtime-dir", str(theirs))
    assert result.returncode != 0 and "belongs to 'nobody'" in result.stderr
    assert "Traceback" not in result.stderr and theirs.stat().st_uid == NOBODY


def test_a_second_broker_on_the_same_gpu_refuses_to_start(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    first = BrokerProcess(
        tmp_path / "first",
        ["--backend", "sim", "--sim-layout", "H100-80GB:7x1g.10gb"],
        lock_dir=locks,
    ).start()
    try:
        # Another state dir, another layout of the same simulated card: the same GPU.
        second = start_broker(tmp_path / "second", "--sim-layout", "H100-80GB:2x3g.40gb")
        assert second.returncode != 0 and "Traceback" not in second.stderr
        assert "already served by another mig-kernel broker" in second.stderr
        assert f"pid {first.proc.pid}" in second.stderr  # type: ignore[union-attr]
        assert str(tmp_path / "first") in second.stderr
        other_card = BrokerProcess(
            tmp_path / "third",
            ["--backend", "sim", "--sim-layout", "A100-40GB:7x1g.5gb"],
            lock_dir=locks,
        ).start()
        other_card.stop()
    finally:
        first.stop()
    again = BrokerProcess(
        tmp_path / "second",
        ["--backend", "sim", "--sim-layout", "H100-80GB:7x1g.10gb"],
        lock_dir=locks,
    ).start()  # the lock went with the first broker
    assert again.stop() == 0


def test_a_killed_broker_leaves_no_lock_behind(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    args = ["--backend", "sim", "--sim-layout", "H100-80GB:7x1g.10gb"]
    first = BrokerProcess(tmp_path / "a", args, lock_dir=locks).start()
    first.kill()
    second = BrokerProcess(tmp_path / "b", args, lock_dir=locks).start()  # raises if refused
    assert second.status()["slices"] and second.stop() == 0
    assert first.start().stop() == 0  # it restarts on its state dir, re-adopting its executors
