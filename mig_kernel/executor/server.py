"""The executor's request loop: one process, one slice, one tenant key at a time.

Dispatch is table-driven (``control_<type>`` for the broker, ``tenant_<type>`` for the lease
holder). Any request that fails gets an error reply naming the problem; the loop never dies of a
bad message.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import zmq

from ..wire.connection import bind_private
from ..wire.errors import AuthenticationError, MigKernelError, UnknownRequest
from ..wire.executor_spec import CONTROL_SENDER, ExecutorSpec
from ..wire.messages import Message, decode, encode, error_body, handler_name, refusal
from ..wire.signing import ReplayGuard
from .runtime import Runtime, warm_start

log = logging.getLogger("mig_kernel.executor")


class ExecutorServer:
    def __init__(self, spec: ExecutorSpec, runtime: Runtime, context: zmq.Context) -> None:
        self.spec = spec
        self.runtime = runtime
        self.control_key = bytes.fromhex(spec.control_key)
        self.tenant_key = bytes.fromhex(spec.tenant_key)
        # Not "now": the broker's ready request was sent while we were still warming up.
        self.guard = ReplayGuard(spec.replay_window, not_before=spec.issued_at or None)
        self.socket = context.socket(zmq.ROUTER)
        self.socket.linger = 1000
        bind_private(self.socket, spec.endpoint)
        self.served = 0  # tenant requests handled with the current key
        self.touched = False  # any tenant request at all: the executor is no longer pristine
        self.last_active = time.time()
        self.running = True

    # -- keys --------------------------------------------------------------------------
    def _key_for(self, header: dict[str, Any]) -> bytes | None:
        return self.control_key if header.get("from") == CONTROL_SENDER else self.tenant_key

    # -- loop --------------------------------------------------------------------------
    def serve(self) -> None:
        while self.running:
            frames = self.socket.recv_multipart(copy=True)
            route, frames = frames[0], frames[1:]
            self._handle(route, frames)
        self.socket.close()

    def _handle(self, route: bytes, frames: list[bytes]) -> None:
        msg: Message | None = None
        key = self.control_key
        try:
            msg = decode(frames, self._key_for, self.guard)
            control = msg.sender == CONTROL_SENDER
            key = self.control_key if control else self.tenant_key
            method = getattr(self, handler_name("control" if control else "tenant", msg.type), None)
            if method is None:
                raise UnknownRequest(f"unknown request type {msg.type!r}")
            if not control:
                self.touched = True
                self.served += 1
                self.last_active = time.time()
            body = method(msg)
            self._send(route, "reply", body, key, msg.id)
        except AuthenticationError as exc:
            # We cannot sign for a key we do not share; answer unsigned so the peer learns why.
            self.socket.send_multipart([route, *refusal(str(exc))])
        except MigKernelError as exc:
            self._send(route, "error", error_body(exc), key, msg.id if msg else None)
        except Exception as exc:  # a bug: report it and keep serving
            log.exception("request failed")
            self._send(route, "error", error_body(exc), key, msg.id if msg else None)

    def _send(self, route: bytes, kind: str, body: dict, key: bytes, re: bytes | None) -> None:
        self.socket.send_multipart([route, *encode(kind, body, key, sender="executor", re=re)])

    # -- control requests ----------------------------------------------------------------
    def control_ready(self, msg: Message) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "executor_id": self.spec.executor_id,
            "runtime": self.runtime.name,
            "warm_seconds": self.runtime.warm_seconds,
            "device": self.runtime.device,
        }

    def control_rekey(self, msg: Message) -> dict[str, Any]:
        if self.touched:
            self.running = False  # it served a tenant: never reused for the next one
            return {"pristine": False}
        self.tenant_key = bytes.fromhex(msg.body["key"])
        return {"pristine": True}

    def control_stats(self, msg: Message) -> dict[str, Any]:
        return {
            "last_active": self.last_active,
            "served": self.served,
            "memory_used": self.runtime.memory_used(),
        }

    def control_shutdown(self, msg: Message) -> dict[str, Any]:
        self.running = False
        return {}

    # -- tenant requests -----------------------------------------------------------------
    def tenant_ping(self, msg: Message) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "slice": self.spec.slice.get("id"),
            "runtime": self.runtime.name,
            "warm_seconds": self.runtime.warm_seconds,
            "device": self.runtime.device,
            "memory_limit": self.spec.memory_limit,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s executor %(levelname)s %(message)s")
    spec = ExecutorSpec.from_json(sys.stdin.read())
    sys.stdin.close()
    runtime = warm_start(spec.runtime, spec.memory_limit)
    log.info(
        "executor %s warm in %.3f s (%s)", spec.executor_id, runtime.warm_seconds, runtime.name
    )
    context = zmq.Context()
    try:
        ExecutorServer(spec, runtime, context).serve()
    finally:
        context.term()
    return 0
