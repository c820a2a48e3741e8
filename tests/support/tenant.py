"""A tenant of a multi-user broker, as a real process of a real OS user (tests only).

``python -m tests.support.tenant BROKER_JSON`` reads one JSON command per line on stdin and
answers one JSON line on stdout, so a test can hold one user's lease open while it drives
another user against it. Errors are answers too: ``{"error": <class name>, "message": ...}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

import numpy as np

from mig_kernel import client as mk


def probe_on_slice(paths: list[str]) -> dict[str, str]:
    """Runs on the slice: what the executor's process may do with each path."""
    import os as _os

    found = {}
    for path in paths:
        try:
            if _os.path.isdir(path):
                _os.listdir(path)
            else:
                with open(path, "rb") as f:
                    f.read(16)
            found[path] = "readable"
        except OSError as exc:
            found[path] = type(exc).__name__
    return found


def whoami() -> dict[str, Any]:
    """Runs on the slice: the executor's identity."""
    import os as _os

    return {
        "uid": _os.getuid(),
        "euid": _os.geteuid(),
        "gid": _os.getgid(),
        "groups": sorted(_os.getgroups()),
        "resuid": list(_os.getresuid()),
        "home": _os.environ.get("HOME"),
        "cwd": _os.getcwd(),
        "env": sorted(_os.environ),
    }


class Tenant:
    def __init__(self, connection_file: str) -> None:
        self.connection_file = connection_file
        self.session: mk.Session | None = None
        self.kept: list[Any] = []  # arrays whose arena segments must stay

    def op_connect(self, tag: str | None = None) -> dict[str, Any]:
        self.session = mk.connect(broker=self.connection_file, tag=tag)
        return {
            "lease": self.session.id,
            "slice": self.session.slice["id"],
            "endpoint": self.session.executor_endpoint,
            "user": self.session.broker.session["user"],
            "client_id": self.session.broker.client_id,
            "client_key": self.session.broker.key.hex(),
            "lease_key": self.session.key.hex(),
        }

    def op_whoami(self) -> dict[str, Any]:
        assert self.session is not None
        return self.session.run(whoami)

    def op_gpu(self) -> dict[str, Any]:
        """A computation on the slice's device (CuPy on a GPU slice)."""
        assert self.session is not None

        def compute() -> dict[str, Any]:
            import os as _os

            total = xp.arange(1 << 20, dtype=xp.float64).sum()  # noqa: F821 (the slice's xp)
            cache = _os.environ.get("CUPY_CACHE_DIR")
            return {
                "module": xp.__name__,  # noqa: F821
                "sum": float(total),
                "visible": _os.environ.get("CUDA_VISIBLE_DEVICES"),
                "kernel_cache": cache,
                "cached_kernels": len(_os.listdir(cache)) if cache else 0,
            }

        found = self.session.run(compute)
        found["expected"] = float(np.arange(1 << 20, dtype=np.float64).sum())
        return found

    def op_tamper(self) -> dict[str, Any]:
        """Tenant code rewriting its own executor so that it claims to be pristine when the
        lease ends, hoping to be handed to the next user as it is (a multi-user broker must
        retire it whatever it claims)."""
        assert self.session is not None

        def tamper() -> dict[str, Any]:
            import gc
            import os as _os

            from mig_kernel.executor.server import ExecutorServer

            for obj in gc.get_objects():
                if isinstance(obj, ExecutorServer):
                    server = obj

                    def pristine(msg: Any, route: bytes, server: Any = server) -> dict[str, Any]:
                        server.tenant_key = bytes.fromhex(msg.body["key"])
                        return {"pristine": True}

                    def become(msg: Any, route: bytes) -> dict[str, Any]:
                        return {"uid": 0, "gid": 0, "user": msg.body["user"]}  # a lie

                    server.touched = False
                    server.control_rekey = pristine
                    server.control_become = become
                    return {"tampered": True, "pid": _os.getpid()}
            return {"tampered": False, "pid": _os.getpid()}

        return self.session.run(tamper)

    def op_probe(self, paths: list[str]) -> dict[str, Any]:
        assert self.session is not None
        return self.session.run(probe_on_slice, paths)

    def op_put(self) -> dict[str, Any]:
        """Leave an array in the arena (its segment stays while the array lives)."""
        assert self.session is not None
        data = np.arange(1 << 16, dtype=np.float64)
        handle = self.session.put(data)
        self.kept.append(handle)
        total = self.session.run(lambda a: float(a.sum()), handle)
        segments = sorted(
            os.path.join(d, n)
            for d in ("/dev/shm", "/tmp")
            for n in _ls(d)
            if n.startswith(f"mig-kernel-{os.getuid()}-")
        )
        return {"sum": total, "segments": segments}

    def op_suspend(self) -> dict[str, Any]:
        assert self.session is not None
        return self.session.suspend()

    def op_release(self) -> dict[str, Any]:
        assert self.session is not None
        self.session.release()
        return {"released": True}

    def op_hello(self, claim: str | None = None) -> dict[str, Any]:
        claims = {"user": claim} if claim else None
        with mk.BrokerClient(self.connection_file, claims=claims) as c:
            return {"user": c.session["user"], "admin": c.session["admin"]}

    def op_broker(self, request: str, **body: Any) -> dict[str, Any]:
        """A request of this user's own new session (release, lease, leases, drain, status)."""
        with mk.BrokerClient(self.connection_file) as c:
            return c.request(request, **body)

    def op_with_credentials(self, client_id: str, client_key: str) -> dict[str, Any]:
        """A request signed with another process's session credentials."""
        creds = (client_id, bytes.fromhex(client_key))
        with mk.BrokerClient(self.connection_file, credentials=creds) as c:
            return c.status()

    def op_attach(self, tag: str) -> dict[str, Any]:
        session = mk.attach(tag=tag, broker=self.connection_file)
        return {"attached": session.id if session is not None else None}

    def op_unix_connect(self, path: str) -> dict[str, Any]:
        """Connect to a socket file as this process (who may reach an executor's socket)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
            except OSError as exc:
                return {"connected": False, "errno": exc.errno, "why": type(exc).__name__}
        return {"connected": True}


def _ls(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def main() -> None:
    tenant = Tenant(sys.argv[1])
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            answer = getattr(tenant, f"op_{op}")(**command)
        except Exception as exc:  # the test reads what went wrong, remote tracebacks included
            answer = {
                "error": type(exc).__name__,
                "message": str(exc),
                "remote_traceback": getattr(exc, "remote_traceback", None),
            }
        print(json.dumps(answer), flush=True)
    if tenant.session is not None and not tenant.session.released:
        tenant.session.release()


if __name__ == "__main__":
    main()
