"""The message envelope: signatures, replay protection, malformed input, connection files."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from mig_kernel.wire import errors as E
from mig_kernel.wire.connection import (
    ConnectionInfo,
    bind_private,
    connection_file_path,
    private_dir,
    read_connection_file,
    runtime_dir_for,
    write_connection_file,
)
from mig_kernel.wire.executor_spec import Account
from mig_kernel.wire.messages import (
    PROTOCOL_VERSION,
    decode,
    encode,
    handler_name,
    refusal,
    refusal_reason,
)
from mig_kernel.wire.signing import ReplayGuard, new_key

KEY = new_key()


def test_round_trip_keeps_type_body_sender_and_payload() -> None:
    frames = encode("acquire", {"profile": "1g.10gb"}, KEY, sender="C-1", payload=[b"fn"])
    msg = decode(frames, lambda h: KEY, ReplayGuard())
    assert (msg.type, msg.body, msg.sender, msg.payload) == (
        "acquire",
        {"profile": "1g.10gb"},
        "C-1",
        [b"fn"],
    )


def test_wrong_key_is_refused() -> None:
    frames = encode("status", {}, new_key())
    with pytest.raises(E.AuthenticationError, match="bad signature"):
        decode(frames, lambda h: KEY, None)


def test_tampered_header_or_payload_is_refused() -> None:
    frames = encode("status", {"a": 1}, KEY, payload=[b"abc"])
    header = msgpack.unpackb(frames[1])
    header["body"]["a"] = 2
    with pytest.raises(E.AuthenticationError):
        decode([frames[0], msgpack.packb(header), frames[2]], lambda h: KEY, None)
    with pytest.raises(E.AuthenticationError):
        decode([frames[0], frames[1], b"abd"], lambda h: KEY, None)
    with pytest.raises(E.AuthenticationError):  # frames cannot be re-cut across the boundary
        decode([frames[0], frames[1], b"ab", b"c"], lambda h: KEY, None)


def test_unsigned_and_malformed_messages_name_the_problem() -> None:
    with pytest.raises(E.MalformedMessage, match="frame"):
        decode([b"only one"], lambda h: KEY, None)
    with pytest.raises(E.AuthenticationError, match="unsigned"):
        decode([b"", msgpack.packb({})], lambda h: KEY, None)
    with pytest.raises(E.MalformedMessage, match="msgpack"):
        decode([b"x" * 32, b"\xc1\xc1\xc1"], lambda h: KEY, None)
    with pytest.raises(E.MalformedMessage, match="version"):
        decode([b"x" * 32, msgpack.packb({"v": 99})], lambda h: KEY, None)
    with pytest.raises(E.MalformedMessage, match="'id'"):
        decode(
            [b"x" * 32, msgpack.packb({"v": PROTOCOL_VERSION, "type": "a", "ts": 1.0, "body": {}})],
            lambda h: KEY,
            None,
        )
    with pytest.raises(E.AuthenticationError, match="unknown sender"):
        decode(encode("a", {}, KEY, sender="ghost"), lambda h: None, None)


def test_replayed_and_stale_messages_are_refused() -> None:
    guard = ReplayGuard(window=5.0, not_before=time.time() - 1)
    frames = encode("status", {}, KEY)
    decode(frames, lambda h: KEY, guard)
    with pytest.raises(E.ReplayedMessage, match="already used"):
        decode(frames, lambda h: KEY, guard)
    assert guard.check(b"new-id", time.time() - 60) is not None
    assert guard.check(b"future", time.time() + 60) is not None
    restarted = ReplayGuard(window=30.0)
    assert "older than this server" in (restarted.check(b"x", time.time() - 5) or "")


def test_replay_guard_forgets_ids_outside_the_window() -> None:
    guard = ReplayGuard(window=1.0, not_before=0)
    now = time.time()
    for i in range(100):
        assert guard.check(str(i).encode(), now, now=now) is None
    guard.check(b"late", now + 2, now=now + 2)
    assert len(guard._seen) <= 2


def test_error_codes_rebuild_their_class() -> None:
    exc = E.error_from_code("quota_exceeded", "too many", {"held": 1})
    assert isinstance(exc, E.QuotaExceeded) and exc.details == {"held": 1}
    unknown = E.error_from_code("brand_new", "x")
    assert type(unknown) is E.MigKernelError and unknown.code == "brand_new"


def test_refusal_frames_are_recognisable() -> None:
    assert refusal_reason(refusal("bad signature")) == "bad signature"
    assert refusal_reason(encode("reply", {}, KEY)) is None


def test_handler_names_refuse_odd_types() -> None:
    assert handler_name("request", "apply-layout") == "request_apply_layout"
    with pytest.raises(E.UnknownRequest):
        handler_name("request", "__class__.x")


def test_connection_file_is_private_and_round_trips(tmp_path: Path) -> None:
    info = ConnectionInfo("ipc:///x", "ipc:///y", KEY.hex(), 1, str(tmp_path), "me", "0")
    path = tmp_path / "broker.json"
    write_connection_file(path, info)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_connection_file(path) == info


def test_missing_or_broken_connection_file_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(E.BrokerUnavailable, match="mig-kernel broker"):
        read_connection_file(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(E.BrokerUnavailable, match="unreadable"):
        read_connection_file(tmp_path / "bad.json")
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(tmp_path / "env.json"))
    assert connection_file_path() == tmp_path / "env.json"
    monkeypatch.delenv("MIG_KERNEL_BROKER")
    monkeypatch.setenv("MIG_KERNEL_STATE_DIR", str(tmp_path / "st"))
    assert connection_file_path() == tmp_path / "st" / "broker.json"


def test_private_dirs_and_sockets(tmp_path: Path) -> None:
    d = private_dir(tmp_path / "run")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    assert stat.S_IMODE(private_dir(loose).stat().st_mode) == 0o700
    rt = runtime_dir_for(tmp_path)
    assert rt == runtime_dir_for(tmp_path) and len(str(rt)) < 90
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        bind_private(sock, f"ipc://{d}/t.sock")
        assert stat.S_IMODE(os.stat(d / "t.sock").st_mode) == 0o600
        sock.close()
    finally:
        ctx.term()


def test_become_accounts_are_checked_field_by_field() -> None:
    body = {"user": "alice", "uid": 1001, "gid": 1001, "groups": [1001, 27], "home": "/h/a"}
    account = Account.from_json(body)
    assert account.groups == (1001, 27) and Account.from_json(account.to_json()) == account
    for bad in ({"uid": -1}, {"uid": True}, {"gid": "0"}, {"groups": [2**32]}, {"groups": None}):
        with pytest.raises(ValueError, match=r"uid/gid|needs user"):
            Account.from_json({**body, **bad})
    with pytest.raises(ValueError, match="needs user, uid, gid, groups and home"):
        Account.from_json({"user": "alice"})
