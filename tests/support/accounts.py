"""Real OS users for the multi-user tests (root only: useradd), and what they need to run this
checkout's Python."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The users' processes import this checkout, and whatever else this process imports from.
PYTHONPATH = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
USERS = ("mkt-alice", "mkt-bob")


def _traversable(path: Path) -> None:
    """Let every user pass through ``path`` and its parents (o+x; nothing becomes listable
    or readable that was not): the users' processes run this checkout's Python, which may live
    under a private home (pyenv under /root)."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & 0o001:
            directory.chmod(mode | 0o001)


def ensure_users(names: tuple[str, ...] = USERS) -> dict[str, pwd.struct_passwd]:
    """The test's OS users (created once with useradd; kept for later runs), able to run this
    Python and import this checkout."""
    for name in names:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--create-home", name], check=True)
    reached = {Path(os.path.realpath(sys.executable)).parent, Path(sys.prefix), REPO}
    reached.update(Path(p) for p in PYTHONPATH.split(os.pathsep) if os.path.isdir(p))
    for path in reached:
        _traversable(path)
    accounts = {name: pwd.getpwnam(name) for name in names}
    probe = subprocess.run(
        [sys.executable, "-c", "import mig_kernel.client, tests.support.tenant"],
        user=names[0],
        group=accounts[names[0]].pw_gid,
        extra_groups=[],
        cwd="/",
        env={"PYTHONPATH": PYTHONPATH, "HOME": accounts[names[0]].pw_dir},
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, f"{names[0]} cannot run this Python: {probe.stderr}"
    return accounts
