"""One ``python -m mig_kernel lab`` process as a user runs it, with its own Jupyter dirs, port
and token (tests/test_lab.py, tests/test_browser.py)."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mig_kernel.testing import wait_until

START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lab:
    """One ``python -m mig_kernel lab`` process with its own Jupyter dirs under ``root``."""

    def __init__(
        self, root: Path, state_dir: Path, args: list[str], lab_args: list[str] | None = None
    ) -> None:
        self.root = root
        self.state_dir = state_dir
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.prefix = root / "prefix"
        self.log_path = root / "lab.log"
        self.data_dir = root / "jupyter-data"  # JUPYTER_DATA_DIR: kernelspecs in kernels/
        self.config_dir = root / "jupyter-config"  # JUPYTER_CONFIG_DIR: lab/user-settings/
        self.args = args  # options of `mig-kernel lab`
        self.lab_args = lab_args or []  # JupyterLab's own, after `--`
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("MIG_KERNEL_BROKER", "MIG_KERNEL_STATE_DIR", "JUPYTER_PATH"):
            env.pop(key, None)
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        env.update(
            HOME=str(home),
            JUPYTER_DATA_DIR=str(self.data_dir),
            JUPYTER_CONFIG_DIR=str(self.config_dir),
            JUPYTER_RUNTIME_DIR=str(self.root / "jupyter-runtime"),
            JUPYTER_CONFIG_PATH="",
        )
        return env

    def start(self) -> Lab:
        cmd = [
            sys.executable,
            "-m",
            "mig_kernel",
            "lab",
            "--state-dir",
            str(self.state_dir),
            "--no-browser",
            "--port",
            str(self.port),
            "--kernelspec-prefix",
            str(self.prefix),
            *self.args,
            "--",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.open_browser=False",
            *self.lab_args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.root
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def wait_ready(self) -> dict[str, Any]:
        """Poll /api/status until JupyterLab answers; fails early if the lab process exits."""

        def answer() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"lab exited {self.proc.returncode}:\n{self.log()}")
            try:
                return self.get("/api/status")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return None

        return wait_until(answer, START_TIMEOUT, f"JupyterLab answering:\n{self.log()}")

    def jupyterlab_pid(self) -> int:
        match = re.search(r"starting JupyterLab \(pid (\d+)\)", self.log())
        assert match, self.log()
        return int(match.group(1))

    def terminate(self, timeout: float = 90.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Teardown after a failure: SIGTERM (a clean stop), SIGKILL if that hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # its children get SIGTERM from the kernel (PR_SET_PDEATHSIG)
            self.proc.wait(10)
