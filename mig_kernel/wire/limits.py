"""Bounds on what a peer may send: message sizes per socket, and every field of a request.

One place checks every request body (``check_body``), on the broker and on the executor alike,
after the signature and before any handler sees it: every number finite and within its bounds,
every string and list of bounded length, nesting bounded. A handler still checks what a field
means (a negative memory size, an unknown profile); this module only guarantees that no field
can be NaN, infinite, absurdly large or long, whatever handler reads it, so a new handler cannot
forget it. Refusals name the field (``field 'timeout': nan is not a finite number``).

Socket limits (ZeroMQ ``MAXMSGSIZE``, checked per frame as it arrives, before any signature can
be checked): a larger frame drops the peer's connection before its bytes are buffered.
"""

from __future__ import annotations

import math
from typing import Any

import zmq

from .errors import BadRequest

MiB = 1 << 20

# -- socket limits (bytes per frame) ---------------------------------------------------------
BROKER_MESSAGE_MAX = 8 * MiB  # the broker's ROUTER: requests are small (the status reply is not)
CONTROL_REPLY_MAX = 1 * MiB  # the broker's DEALERs to executors: ready, stats, spill reports...
WATCH_MESSAGE_MAX = 64 * 1024  # the watch PUB socket only ever receives subscriptions
# An executor's ROUTER (ipc and tcp): the header, a pickled function or its arguments, and
# over tcp the array data, which clients cut into frames of at most ARRAY_CHUNK bytes.
EXECUTOR_FRAME_MAX = 64 * MiB
ARRAY_CHUNK = 16 * MiB
# Control requests queued to one executor before the broker stops sending (it does not read:
# hung or stopped); the broker never blocks on a send.
CONTROL_QUEUE = 64


def limit_frames(socket: zmq.Socket, max_bytes: int) -> None:
    """Refuse (drop the connection of) any peer that sends a frame over ``max_bytes``."""
    socket.setsockopt(zmq.MAXMSGSIZE, max_bytes)


# -- field bounds --------------------------------------------------------------------------
MAX_SECONDS = 366 * 86400.0  # any duration or timeout: at most a year
MAX_INT = 2**53  # integers a JSON reader (the panel) and SQLite both hold exactly
MAX_STRING = 4096  # characters of a string field without a bound of its own (a path)
MAX_ITEMS = 100_000  # items of one list or map
MAX_DEPTH = 16  # nesting of lists and maps
ID_CHARS = 64  # ticket, lease, slice, client and call ids

# Fields with bounds of their own, whatever message carries them.
STRING_LIMITS: dict[str, int] = {
    "ticket": ID_CHARS,
    "lease_id": ID_CHARS,
    "slice_id": ID_CHARS,
    "call_id": ID_CHARS,
    "target": ID_CHARS,
    "restore": ID_CHARS,
    "profile": ID_CHARS,
    "tag": 200,
    "label": 1000,
    "user": 256,
    "hub_token": 1024,
}
DURATIONS = frozenset({"timeout", "idle_timeout"})


_PLAIN = (bytes, bool, type(None))  # nothing to bound beyond the message size


def check_body(body: dict[str, Any]) -> None:
    """Raise BadRequest naming the first field out of bounds (see the module's docstring).

    On the data plane's path (an invocation): about a microsecond for a typical body."""
    if len(body) > MAX_ITEMS:
        raise BadRequest(f"the body has {len(body)} fields; at most {MAX_ITEMS}")
    for name, item in body.items():
        if isinstance(name, str) and len(name) > 256:
            raise BadRequest(f"a field name of {len(name)} characters; at most 256")
        kind = type(item)
        if kind in _PLAIN or (kind is str and len(item) <= ID_CHARS):
            continue  # nothing to bound, or shorter than any string bound
        _check(item, str(name), name if isinstance(name, str) else None, 1)


def _check_map(value: dict[Any, Any], path: str, depth: int) -> None:
    if len(value) > MAX_ITEMS:
        raise BadRequest(f"field {path or 'body'!r} has {len(value)} entries; at most {MAX_ITEMS}")
    for name, item in value.items():
        if isinstance(name, str):
            if len(name) > 256:
                raise BadRequest(f"a field name of {len(name)} characters; at most 256")
            where = f"{path}.{name}" if path else name
        else:
            where = f"{path}[{name!r}]"
        _check(item, where, name if isinstance(name, str) else None, depth + 1)


def _check(value: Any, path: str, name: str | None, depth: int) -> None:
    kind = type(value)
    if kind in _PLAIN:
        return
    if kind is float:
        if not math.isfinite(value):
            raise BadRequest(f"field {path!r}: {value} is not a finite number")
        limit = MAX_SECONDS if name in DURATIONS else float(MAX_INT)
        if abs(value) > limit:
            raise BadRequest(f"field {path!r}: {value:g} is out of range (at most {limit:g})")
    elif kind is int:
        limit = int(MAX_SECONDS) if name in DURATIONS else MAX_INT
        if abs(value) > limit:
            raise BadRequest(f"field {path!r}: {value} is out of range (at most {limit})")
    elif kind is str:
        limit = STRING_LIMITS.get(name or "", MAX_STRING)
        if len(value) > limit:
            raise BadRequest(
                f"{name or path} is {len(value)} characters long; at most {limit} are allowed"
            )
    elif kind is list or kind is dict:
        if depth > MAX_DEPTH:
            raise BadRequest(f"field {path!r} is nested more than {MAX_DEPTH} levels deep")
        if kind is dict:
            _check_map(value, path, depth)
            return
        if len(value) > MAX_ITEMS:
            raise BadRequest(f"field {path!r} has {len(value)} items; at most {MAX_ITEMS}")
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]", name, depth + 1)


def finite_timestamp(ts: Any) -> bool:
    """Whether a header's ``ts`` is a real number of seconds (not NaN, not infinite)."""
    return isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts)
