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
from pathlib import Path
from typing import Any

import zmq

from ..wire.connection import bind_private
from ..wire.errors import (
    AuthenticationError,
    BadRequest,
    LeaseEnded,
    MigKernelError,
    UnknownRequest,
)
from ..wire.executor_spec import CONTROL_SENDER, ExecutorSpec
from ..wire.messages import Message, decode, encode, error_body, handler_name, refusal
from ..wire.signing import ReplayGuard
from .dataplane import OUTBOX, DataPlane, Job
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
        self.sealed = False  # spilled for a reclaim: tenant requests are refused
        self.outbox = context.socket(zmq.PULL)
        self.outbox.linger = 0
        self.outbox.bind(OUTBOX)  # bound before the data plane's threads connect to it
        self.dataplane = DataPlane(runtime, context, spec.memory_limit)

    # -- keys --------------------------------------------------------------------------
    def _key_for(self, header: dict[str, Any]) -> bytes | None:
        return self.control_key if header.get("from") == CONTROL_SENDER else self.tenant_key

    # -- loop --------------------------------------------------------------------------
    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        while self.running:
            events = dict(poller.poll(100))
            if self.outbox in events:
                while True:
                    try:
                        route, kind, body, data = self.outbox.recv_pyobj(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._send(route, kind, body, self.tenant_key, None, data)
            if self.socket in events:
                frames = self.socket.recv_multipart(copy=True)
                self._handle(frames[0], frames[1:])
            self._check_deadline()
        self.dataplane.stop()
        self.dataplane.runner.join(timeout=5)
        self.outbox.close()
        self.socket.close()

    def _check_deadline(self) -> None:
        """A call past its timeout cannot be stopped inside Python: the caller is told, and the
        executor exits so the broker replaces it (the lease keeps its slice)."""
        running = self.dataplane.running
        if running is None or time.time() <= running[2]:
            return
        call_id, route, _ = running
        self._send(
            route,
            "error",
            {
                "call_id": call_id,
                "type": "TimeoutError",
                "module": "builtins",
                "message": "the call exceeded its timeout; the executor was stopped and is being "
                "replaced, and this lease's device arrays are lost",
                "traceback": "",
            },
            self.tenant_key,
            None,
        )
        log.error("call %s timed out; exiting so the broker replaces this executor", call_id)
        self.socket.close(linger=1000)
        os._exit(70)

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
                if self.sealed:
                    raise LeaseEnded(
                        "the slice was reclaimed (its device data was saved for a restore); "
                        "lease again",
                        reason="reclaimed",
                    )
                self.touched = True
                self.served += 1
                self.last_active = time.time()
            body = method(msg, route)
            if body is not None:
                self._send(route, "reply", body, key, msg.id)
        except AuthenticationError as exc:
            # We cannot sign for a key we do not share; answer unsigned so the peer learns why.
            self.socket.send_multipart([route, *refusal(str(exc))])
        except MigKernelError as exc:
            self._send(route, "error", self._error_body(exc, msg), key, msg.id if msg else None)
        except Exception as exc:  # a bug: report it and keep serving
            log.exception("request failed")
            self._send(route, "error", self._error_body(exc, msg), key, msg.id if msg else None)

    @staticmethod
    def _error_body(exc: Exception, msg: Message | None) -> dict[str, Any]:
        """An error reply, carrying the call id so the caller's future gets it."""
        body = error_body(exc)
        if msg is not None and isinstance(msg.body.get("call_id"), str):
            body["call_id"] = msg.body["call_id"]
        return body

    def _send(
        self, route: bytes, kind: str, body: dict, key: bytes, re: bytes | None, data: bytes = b""
    ) -> None:
        frames = encode(kind, body, key, sender="executor", re=re, payload=[data] if data else ())
        self.socket.send_multipart([route, *frames])

    # -- control requests ----------------------------------------------------------------
    def control_ready(self, msg: Message, route: bytes) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "executor_id": self.spec.executor_id,
            "runtime": self.runtime.name,
            "warm_seconds": self.runtime.warm_seconds,
            "device": self.runtime.device,
        }

    def control_rekey(self, msg: Message, route: bytes) -> dict[str, Any]:
        if self.touched:
            self.running = False  # it served a tenant: never reused for the next one
            return {"pristine": False}
        self.tenant_key = bytes.fromhex(msg.body["key"])
        return {"pristine": True}

    def control_stats(self, msg: Message, route: bytes) -> dict[str, Any]:
        busy = self.dataplane.running is not None
        return {
            "last_active": time.time()
            if busy
            else max(self.last_active, self.dataplane.last_active),
            "served": self.served,
            "memory_used": self.dataplane.memory_used(),
            "busy_seconds": self.dataplane.busy_seconds,  # finished calls: a long call counts
            "at": time.monotonic(),  # at its end; the share is smoothed over stats intervals
        }

    def control_spill(self, msg: Message, route: bytes) -> dict[str, Any]:
        # From now on the tenant's requests are refused: a call that ran after the spill
        # would change data that is no longer the data the restore brings back.
        self.sealed = True
        return self.dataplane.spill(Path(msg.body["path"]))

    def control_restore(self, msg: Message, route: bytes) -> dict[str, Any]:
        result = self.dataplane.restore(Path(msg.body["path"]))
        self.touched = True  # it holds a tenant's data now
        return result

    def control_shutdown(self, msg: Message, route: bytes) -> dict[str, Any]:
        self.running = False
        return {}

    # -- tenant requests -----------------------------------------------------------------
    def tenant_ping(self, msg: Message, route: bytes) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "slice": self.spec.slice.get("id"),
            "runtime": self.runtime.name,
            "warm_seconds": self.runtime.warm_seconds,
            "device": self.runtime.device,
            "memory_limit": self.spec.memory_limit,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    # -- data plane: queued to the stager/runner threads, answered from there ---------------
    def _job(self, kind: str, msg: Message, route: bytes, needs_payload: bool) -> Job:
        call_id = msg.body.get("call_id")
        if not isinstance(call_id, str):
            raise BadRequest("field 'call_id' is required")
        timeout = msg.body.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise BadRequest(f"timeout must be a positive number of seconds, got {timeout!r}")
        if needs_payload and len(msg.payload) != 2:
            raise BadRequest("an invocation carries two frames: the function and its arguments")
        fn_data, data = msg.payload if needs_payload else (b"", b"")
        return Job(kind, route, call_id, msg.body, data, fn_data)

    def tenant_invoke(self, msg: Message, route: bytes) -> None:
        self.dataplane.submit(self._job("invoke", msg, route, True))

    def tenant_call(self, msg: Message, route: bytes) -> None:
        if msg.body.get("op") not in ("alloc", "put", "launch"):
            raise BadRequest(f"unknown call {msg.body.get('op')!r}: expected alloc, put or launch")
        self.dataplane.submit(self._job("call", msg, route, True))

    def tenant_fetch(self, msg: Message, route: bytes) -> None:
        items = msg.body.get("items")
        if not isinstance(items, list) or not all(
            isinstance(i, list) and len(i) == 4 for i in items
        ):
            raise BadRequest("fetch needs items [[handle, segment, offset, nbytes], ...]")
        self.dataplane.fetch(self._job("fetch", msg, route, False))

    def tenant_cancel(self, msg: Message, route: bytes) -> dict[str, Any]:
        call_id = msg.body.get("target")
        if not isinstance(call_id, str):
            raise BadRequest("cancel needs target: the call id to cancel")
        # No call id in the reply: nobody waits for it (the caller waits for the call itself).
        return {"cancelled": self.dataplane.cancel(call_id)}

    def tenant_reset(self, msg: Message, route: bytes) -> dict[str, Any]:
        return {"call_id": msg.body.get("call_id"), "freed": self.dataplane.reset()}

    def tenant_free(self, msg: Message, route: bytes) -> dict[str, Any]:
        ids = msg.body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise BadRequest("free needs ids: [int, ...]")
        self.dataplane.free(ids)
        return {"freed": len(ids)}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s executor %(levelname)s %(message)s")
    spec = ExecutorSpec.from_json(sys.stdin.read())
    sys.stdin.close()
    runtime = warm_start(spec.runtime, spec.memory_limit)
    log.info(
        "executor %s warm in %.3f s (%s)", spec.executor_id, runtime.warm_seconds, runtime.name
    )
    context = zmq.Context()
    server = ExecutorServer(spec, runtime, context)
    server.serve()
    if server.dataplane.runner.is_alive():
        # A function is still running and cannot be interrupted: leave without waiting for it.
        logging.shutdown()
        os._exit(0)
    context.term()
    return 0
