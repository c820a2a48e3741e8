"""A real JupyterHub for tests: share/jupyterhub/jupyterhub_config.py (the deployment guide's
file) run by the `jupyterhub` command with configurable-http-proxy, and a user's way through it
over HTTP: log in with the form, get a token, start the server, start a kernel through the
server's REST API and execute cells over its websocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "share" / "jupyterhub" / "jupyterhub_config.py"
PASSWORD = "mig-kernel-test-password"


def free_port_pair() -> int:
    """A port whose successor is free too (the proxy's and the hub's)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


class Hub:
    def __init__(self, state: Path, env: dict[str, str]) -> None:
        self.state = state
        self.port = free_port_pair()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"http://127.0.0.1:{self.port + 1}/hub/api"
        self.log = state / "hub.log"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
            "MIG_HUB_STATE": str(state),
            "MIG_HUB_PORT": str(self.port),
            "MIG_HUB_PASSWORD": PASSWORD,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Hub:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(CONFIG)],
                cwd=self.state,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited: {self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.api + "/", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass  # not listening yet
            time.sleep(0.2)
        raise RuntimeError(f"jupyterhub did not start: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def login(self, name: str, password: str = PASSWORD, note: str = "mig-kernel test") -> HubUser:
        """Log in with the hub's form (as a browser would) and take a token for the API."""
        with requests.Session() as session:
            session.get(f"{self.url}/hub/login", timeout=10)
            xsrf = session.cookies.get("_xsrf", "")
            answer = session.post(
                f"{self.url}/hub/login",
                data={"username": name, "password": password, "_xsrf": xsrf},
                allow_redirects=False,
                timeout=30,
            )
            if answer.status_code != 302:
                raise AssertionError(f"login of {name} failed: {answer.status_code} {answer.text}")
            made = session.post(
                f"{self.url}/hub/api/users/{name}/tokens",
                json={"note": note, "expires_in": 3600},
                headers={"X-XSRFToken": session.cookies.get("_xsrf", xsrf)},
                timeout=10,
            )
            made.raise_for_status()
        return HubUser(self, name, made.json()["token"])


class HubUser:
    def __init__(self, hub: Hub, name: str, token: str) -> None:
        self.hub = hub
        self.name = name
        self.token = token
        self.headers = {"Authorization": f"token {token}"}
        self.server = f"{hub.url}/user/{name}"

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(
            method, f"{self.hub.api}{path}", headers=self.headers, timeout=30, **kwargs
        )

    def start_server(self, timeout: float = 120.0) -> None:
        answer = self.api("POST", f"/users/{self.name}/server")
        assert answer.status_code in (201, 202, 400), answer.text  # 400: already running
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{self.name}").json()
            server = (model.get("servers") or {}).get("")
            if server and server.get("ready"):
                return
            time.sleep(0.5)
        raise AssertionError(
            f"{self.name}'s server did not start: {self.hub.log.read_text()[-3000:]}"
        )

    def stop_server(self, timeout: float = 60.0) -> None:
        answer = self.api("DELETE", f"/users/{self.name}/server")
        assert answer.status_code in (202, 204), answer.text
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not (self.api("GET", f"/users/{self.name}").json().get("servers") or {}):
                return
            time.sleep(0.5)
        raise AssertionError(f"{self.name}'s server did not stop")

    def rest(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The user's own server, through the proxy (its jupyter_server REST API)."""
        return requests.request(
            method, f"{self.server}{path}", headers=self.headers, timeout=60, **kwargs
        )

    def start_kernel(self, name: str = "mig-python3") -> str:
        answer = self.rest("POST", "/api/kernels", json={"name": name})
        assert answer.status_code == 201, answer.text
        return answer.json()["id"]

    def execute(self, kernel_id: str, code: str, timeout: float = 90.0) -> dict[str, Any]:
        """Run ``code`` through the kernel's websocket: its stdout, stderr and reply."""
        return asyncio.run(self._execute(kernel_id, code, timeout))

    async def _execute(self, kernel_id: str, code: str, timeout: float) -> dict[str, Any]:
        url = self.server.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
        connection = await websocket_connect(HTTPRequest(url, headers=self.headers))
        msg_id = uuid.uuid4().hex
        request = {
            "header": {
                "msg_id": msg_id,
                "msg_type": "execute_request",
                "username": self.name,
                "session": uuid.uuid4().hex,
                "version": "5.3",
                "date": "",
            },
            "parent_header": {},
            "metadata": {},
            "content": {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
            "channel": "shell",
            "buffers": [],
        }
        connection.write_message(json.dumps(request))
        found: dict[str, Any] = {"stdout": "", "stderr": "", "error": None, "reply": None}

        async def collect() -> None:
            idle = False
            while not (idle and found["reply"] is not None):
                raw = await connection.read_message()
                if raw is None:
                    raise AssertionError("the kernel's websocket closed")
                if isinstance(raw, bytes):
                    continue  # a binary-framed message: none of ours
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    found[content["name"]] += content["text"]
                elif kind == "error":
                    found["error"] = f"{content['ename']}: {content['evalue']}"
                elif kind == "status" and content["execution_state"] == "idle":
                    idle = True
                elif kind == "execute_reply":
                    found["reply"] = content["status"]

        try:
            await asyncio.wait_for(collect(), timeout)
        finally:
            connection.close()
            # Let the close handshake finish (read_message answers None once it has), then
            # close the TCP stream for good: asyncio.run's loop ends right after this.
            with contextlib.suppress(Exception):
                while await asyncio.wait_for(connection.read_message(), 5) is not None:
                    pass  # messages after ours: only the close (None) ends the wait
            stream = getattr(connection, "stream", None)
            if stream is not None and not stream.closed():
                stream.close()
        return found
