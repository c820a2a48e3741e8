"""Hostile messages for the fuzzer (tests/test_fuzz.py): random and mutated frames, truncated and
oversized ones, and correctly signed messages whose header and body fields hold hostile values
(NaN, infinities, huge numbers, long strings, deep nesting, wrong types)."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from mig_kernel.wire.messages import PROTOCOL_VERSION, _mac, encode

HOSTILE_NUMBERS = [
    math.nan,
    math.inf,
    -math.inf,
    -1,
    0,
    -0.0,
    1e300,
    -1e300,
    2**63 - 1,
    2**64 - 1,
    -(2**63),
    5e-324,
    True,
]


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    """One value a hostile peer might put in a field."""
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(HOSTILE_NUMBERS)
    if roll < 0.45:
        return "x" * rng.choice([0, 1, 65, 201, 1001, 5000, 100_000])
    if roll < 0.55:
        return rng.randbytes(rng.choice([0, 1, 16, 32, 1000]))
    if roll < 0.65 and depth < 40:
        return [hostile_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 3]))]
    if roll < 0.7 and depth < 40:  # nested deeper than any handler expects
        value: Any = 1
        for _ in range(rng.choice([20, 100])):
            value = [value]
        return value
    if roll < 0.8 and depth < 40:
        return {rng.choice(["a", "id", "path", "x" * 300]): hostile_value(rng, depth + 1)}
    if roll < 0.9:
        return None
    return rng.choice(["", "0", "L-0", "C-nobody", "../../etc/passwd", "\x00", "é" * 10])


@dataclass
class Target:
    """Where the fuzzer sends: an endpoint, what a valid sender signs with, the request types
    it knows, and the size of frame its socket refuses."""

    endpoint: str
    key: bytes
    sender: str | None
    types: list[str]
    fields: list[str]
    oversize: int
    extra_keys: list[tuple[str, bytes]] = field(default_factory=list)  # (sender, key)


def signed(key: bytes, header: dict[str, Any], payload: list[bytes] | None = None) -> list[bytes]:
    raw = msgpack.packb(header, use_bin_type=True)
    return [_mac(key, raw, payload or []), raw, *(payload or [])]


def message(rng: random.Random, target: Target, kind: str) -> list[bytes]:
    """One hostile message of ``kind``: random, mutated, truncated, oversized, header, body."""
    sender, key = target.sender, target.key
    if target.extra_keys and rng.random() < 0.3:
        sender, key = rng.choice(target.extra_keys)
    msg_type = rng.choice([*target.types, "no_such_request", "x" * 100, "__init__"])
    if kind == "random":
        sizes = [0, 1, 31, 32, 33, 200, 5000]
        return [rng.randbytes(rng.choice(sizes)) for _ in range(rng.randint(1, 5))]
    valid = encode(msg_type, body(rng, target), key, sender=sender)
    if kind == "mutated":
        frames = [bytearray(f) for f in valid]
        for _ in range(rng.randint(1, 8)):
            frame = rng.choice(frames)
            if frame:
                frame[rng.randrange(len(frame))] = rng.randrange(256)
        return [bytes(f) for f in frames]
    if kind == "truncated":
        frames = list(valid)
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
        if rng.random() < 0.3:
            frames = frames[: rng.randrange(len(frames))] or [b""]
        return frames
    if kind == "oversized":
        return [bytes(32), bytes(target.oversize + 1)]
    if kind == "header":  # correctly signed, hostile header fields
        header = {
            "v": rng.choice([PROTOCOL_VERSION, PROTOCOL_VERSION, 1, None, "2", math.nan]),
            "type": rng.choice([msg_type, msg_type, None, 7, b"status"]),
            "id": rng.choice([os.urandom(16), b"", b"same-id-always!!", None, 1]),
            "ts": rng.choice([*HOSTILE_NUMBERS, None, "now"]),
            "from": rng.choice([sender, sender, None, 1, "x" * 1000]),
            "re": rng.choice([None, b"", 1.5]),
            "body": rng.choice([body(rng, target), None, [], "body"]),
        }
        return signed(key, header)
    # "body": correctly signed and fresh; only the fields are hostile
    return valid


def body(rng: random.Random, target: Target) -> dict[str, Any]:
    names = rng.sample(target.fields, rng.randint(0, min(6, len(target.fields))))
    return {name: hostile_value(rng) for name in names}


KINDS = ["random", "mutated", "truncated", "header", "body", "body", "body"]


@dataclass
class Report:
    sent: int = 0
    answered: int = 0
    oversized: int = 0


def fuzz(
    target: Target, count: int, seed: int, alive: Callable[[], bool], every_oversized: int = 500
) -> Report:
    """Send ``count`` hostile messages, draining answers as they come; ``alive`` is checked
    every hundred messages (the process under test must never die)."""
    rng = random.Random(seed)
    ctx = zmq.Context()
    report = Report()
    sock = _socket(ctx, target.endpoint)
    try:
        for i in range(count):
            kind = "oversized" if i % every_oversized == every_oversized - 1 else rng.choice(KINDS)
            frames = message(rng, target, kind)
            if kind == "oversized":
                # the peer drops the connection, and with it the answers it still owes: take
                # those first
                report.answered += _drain(sock, 200, quiet_ms=1000)
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=kind != "oversized")
            except zmq.Again:  # the peer is slower than us: let it catch up
                report.answered += _drain(sock, 1000)
                sock.send_multipart(frames)
            report.sent += 1
            if kind == "oversized":  # the peer drops this connection: start another
                report.oversized += 1
                report.answered += _drain(sock, 200)
                sock.close(linger=0)
                sock = _socket(ctx, target.endpoint)
            elif i % 20 == 19:
                report.answered += _drain(sock, 50)
            if i % 100 == 99:
                assert alive(), f"the process under test died after {i + 1} messages"
        report.answered += _drain(sock, 500, quiet_ms=2000)
    finally:
        sock.close(linger=0)
        ctx.term()
    return report


def _socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 1000
    sock.connect(endpoint)
    return sock


def _drain(sock: zmq.Socket, wait_ms: int, quiet_ms: int = 0) -> int:
    """Receive what comes within ``wait_ms``, then until ``quiet_ms`` pass without any (a
    loaded peer may still be working through what it was sent)."""
    got = 0
    while sock.poll(wait_ms):
        sock.recv_multipart()
        got += 1
        wait_ms = quiet_ms
    return got


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
