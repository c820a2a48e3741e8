"""The contract between the broker and an executor process it starts.

The broker writes an ``ExecutorSpec`` as JSON to the executor's stdin (never argv: keys would be
visible in ``ps``), with ``CUDA_VISIBLE_DEVICES`` already set in its environment. The executor
warms its runtime, binds a ROUTER at ``endpoint`` (a ``tcp://`` one on the listening socket
``listen_fd`` the broker reserved for it, see wire/transport.py) and serves. The broker connects
and sends ``ready`` right after spawning; ZeroMQ keeps that request queued until the executor
binds, so the reply arrives exactly when the executor is usable.

Control requests (sender ``"broker"``, signed with ``control_key``):
- ``ready {broker_pid, broker_ticks}`` -> ``{pid, runtime, warm_seconds, device}``; the body
  names the broker process (a restarted broker re-adopting the executor names itself).
- ``rekey {key}`` -> ``{pristine: true}`` and the new tenant key replaces the old one, or
  ``{pristine: false}`` and the executor exits: it served a tenant request, so it is not reused.
- ``become {user, uid, gid, groups, home}`` -> ``{uid, gid, user}`` (multi-user brokers only,
  before the grant is answered): the executor switches to the holder's account for good; until
  then it refuses tenant requests. See executor/privileges.py.
- ``stats {holder_pid, holder_ticks}`` -> ``{last_active, served, memory_used}``; the body
  names the lease holder's process, which keeps an executor without a broker alive.
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
    # Without a live broker and a live lease holder for this long the executor exits, saving a
    # held lease's data under ``spill_root`` first (0: never; executor/orphan.py).
    orphan_grace: float = 0.0
    spill_root: str = ""
    broker_pid: int | None = None
    broker_ticks: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExecutorSpec:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Account:
    """The OS account an executor of a multi-user broker becomes: the ``become`` body."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "groups": list(self.groups)}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Account:
        """Checked field by field (ValueError naming the problem): ids are what the executor
        will switch to, so nothing but plain non-negative integers passes."""
        try:
            return cls(
                user=str(body["user"]),
                uid=_os_id(body["uid"]),
                gid=_os_id(body["gid"]),
                groups=tuple(_os_id(g) for g in body["groups"]),
                home=str(body["home"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"an account needs user, uid, gid, groups and home: {exc}") from None


def _os_id(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32 - 1:
        raise ValueError(f"{value!r} is not a uid/gid")
    return value
