"""Real kernels for the notebook tests: kernelspecs in a temp dir, a jupyter_client
KernelManager (with the installed mig-provisioner entry point), and a cell runner that collects
what a notebook would show."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from mig_kernel.jupyter.kernelspec import kernel_json


@dataclass
class CellResult:
    status: str
    stdout: str = ""
    stderr: str = ""
    results: list[str] = field(default_factory=list)  # execute_result text/plain
    displays: list[str] = field(default_factory=list)  # display_data / update text/plain
    error: dict[str, Any] | None = None  # ename, evalue, traceback

    @property
    def traceback(self) -> str:
        return "\n".join(self.error["traceback"]) if self.error else ""


class Kernel:
    """One running kernel and its blocking client."""

    def __init__(self, km: KernelManager) -> None:
        self.km = km
        self.client = km.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    @property
    def kernel_id(self) -> str:
        return str(self.km.kernel_id)

    @property
    def tag(self) -> str:
        return f"kernel:{self.kernel_id}"

    @property
    def pid(self) -> int:
        return int(self.km.provisioner.process.pid)  # type: ignore[union-attr]

    def run(self, code: str, timeout: float = 60.0) -> CellResult:
        result = CellResult(status="")

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    result.stdout += content["text"]
                else:
                    result.stderr += content["text"]
            elif kind == "execute_result":
                result.results.append(content["data"].get("text/plain", ""))
            elif kind in ("display_data", "update_display_data"):
                result.displays.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                result.error = content

        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=hook)
        result.status = reply["content"]["status"]
        if result.status == "error" and result.error is None:  # UsageError: told in the reply
            result.error = reply["content"]
        return result

    def start_cell(self, code: str) -> str:
        """Send a cell without waiting (for interrupts); returns the request's msg id."""
        return str(self.client.execute(code))

    def wait_reply(self, msg_id: str, timeout: float = 30.0) -> dict[str, Any]:
        while True:
            reply = self.client.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    def wait_for_output(self, msg_id: str, needle: str, timeout: float = 30.0) -> str:
        """Read iopub until an output of ``msg_id`` contains ``needle``."""
        seen = ""
        while needle not in seen:
            msg = self.client.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            content = msg["content"]
            seen += content.get("text", "") + str(content.get("data", {}).get("text/plain", ""))
        return seen

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def restart(self) -> None:
        self.km.restart_kernel()
        self.client.wait_for_ready(timeout=60)

    def kill_hard(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def shutdown(self) -> None:
        self.client.stop_channels()
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=False)


class Kernels:
    """Writes kernelspecs into ``root`` and starts kernels from them; stops all at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ksm = KernelSpecManager(kernel_dirs=[str(root)])
        self.started: list[Kernel] = []

    def spec(self, name: str, profile: str | None = None, **config: Any) -> str:
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        spec = kernel_json(profile, f"test {name}", **config)
        (directory / "kernel.json").write_text(json.dumps(spec))
        return name

    def start(self, name: str, env: dict[str, str] | None = None) -> Kernel:
        km = KernelManager(kernel_name=name, kernel_spec_manager=self.ksm)
        km.start_kernel(env={**os.environ, **(env or {})})
        kernel = Kernel(km)
        self.started.append(kernel)
        return kernel

    def stop_all(self) -> None:
        for kernel in self.started:
            try:
                kernel.shutdown()
            except Exception:  # a kernel a test killed: make sure nothing is left
                if kernel.km.has_kernel:
                    kernel.km.shutdown_kernel(now=True)
