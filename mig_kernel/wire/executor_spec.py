"""The contract between the broker and an executor process it starts.

The broker writes an ``ExecutorSpec`` as JSON to the executor's stdin (never argv: keys would be
visible in ``ps``), with ``CUDA_VISIBLE_DEVICES`` already set in its environment. The executor
warms its runtime, binds a ROUTER at ``endpoint`` (a ``tcp://`` one on the listening socket
``listen_fd`` the broker reserved for it, see wire/transport.py) and serves. The broker connects
and sends ``ready`` right after spawning; ZeroMQ keeps that request queued until the executor
binds, so the reply arrives exactly when the executor is usable.

Control requests (sender ``"broker"``, signed with ``control_key``):
- ``ready`` -> ``{pid, runtime, warm_seconds, device}``
- ``rekey {key}`` -> ``{pristine: true}`` and the new tenant key replaces the old one, or
  ``{pristine: false}`` and the executor exits: it served a tenant request, so it is not reused.
- ``become {user, uid, gid, groups, home}`` -> ``{uid, gid, user}`` (multi-user brokers only,
  before the grant is answered): the executor switches to the holder's account for good; until
  then it refuses tenant requests. See executor/privileges.py.
- ``stats`` -> ``{last_active, served, memory_used}``
- ``shutdown`` -> ``{}`` and exit.
Tenant requests (sender = the lease id, signed with ``tenant_key``): ``ping`` -> ``{pid, slice,
runtime}``; the data-plane requests join this list.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

CONTROL_SENDER = "broker"


@dataclass(frozen=True)
class ExecutorSpec:
    executor_id: str
    endpoint: str
    control_key: str  # hex
    tenant_key: str  # hex; pre-bound: handed to a client only when its lease is granted
    slice: dict[str, Any]  # SliceInfo.to_json()
    runtime: str  # "numpy" or "cupy"
    memory_limit: int | None
    replay_window: float = 30.0
    issued_at: float = 0.0  # messages stamped earlier are refused (none can be meant for us)
    listen_fd: int | None = None  # tcp: the inherited listening socket of ``endpoint``
    multi_user: bool = False  # serve no tenant request before ``become``

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExecutorSpec:
        return cls(**json.loads(text))
