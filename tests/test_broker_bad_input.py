"""Bad input of every kind gets a clear error; the broker keeps running and loses nothing."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import zmq

from mig_kernel.testing import count, run_cli
from mig_kernel.wire import errors as E
from mig_kernel.wire.connection import read_connection_file
from mig_kernel.wire.messages import encode, refusal_reason


@pytest.fixture
def raw(make_broker):
    """A raw DEALER on a running broker, plus the broker."""
    broker = make_broker(layout="H100-80GB:2x1g.10gb")
    info = read_connection_file(broker.connection_file)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(info.endpoint)
    yield broker, sock, info
    sock.close()
    ctx.term()


def answer(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "the broker did not answer"
    return sock.recv_multipart()


def test_garbage_unsigned_and_forged_messages_are_refused_with_reasons(raw) -> None:
    broker, sock, _info = raw
    with broker.client() as c:
        lease = c.acquire()
        sock.send_multipart([b"garbage"])
        assert "frame" in refusal_reason(answer(sock))
        sock.send_multipart([b"", msgpack.packb({"type": "status"})])
        assert "unsigned" in refusal_reason(answer(sock))
        sock.send_multipart([b"s" * 32, b"\xc1not msgpack"])
        assert "msgpack" in refusal_reason(answer(sock))
        forged = encode("hello", {}, b"not the broker key" * 2)
        sock.send_multipart(forged)
        assert "bad signature" in refusal_reason(answer(sock))
        impostor = encode("status", {}, b"k" * 32, sender=c.client_id)  # right id, wrong key
        sock.send_multipart(impostor)
        assert "bad signature" in refusal_reason(answer(sock))
        sock.send_multipart(encode("status", {}, b"k" * 32, sender="C-nobody"))
        assert "unknown sender" in refusal_reason(answer(sock))
        # nothing was lost: the lease is intact and the broker answers
        assert c.heartbeat([lease["id"]])[lease["id"]]["state"] == "active"
        assert count(c.status(), "leased") == 1
        c.release(lease["id"])


def test_replayed_message_is_refused(raw) -> None:
    broker, sock, info = raw
    frames = encode("hello", {}, info.key_bytes)
    sock.send_multipart(frames)
    first = msgpack.unpackb(answer(sock)[1])
    assert first["type"] == "reply"
    sock.send_multipart(frames)
    second = msgpack.unpackb(answer(sock)[1])
    assert second["type"] == "error" and second["body"]["code"] == "replayed_message"
    with broker.client() as c:
        assert 'mig_kernel_rejected_messages_total{reason="replayed_message"} 1.0' in c.metrics()


def test_unknown_requests_and_wrong_types_get_named_errors(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb")
    with broker.client() as c:
        with pytest.raises(E.UnknownRequest, match="'launch_missiles'"):
            c.request("launch_missiles")
        with pytest.raises(E.BadRequest, match="'lease_id' is required"):
            c.request("release")
        with pytest.raises(E.BadRequest, match="'lease_ids' has the wrong type"):
            c.request("heartbeat", lease_ids="L-1")
        with pytest.raises(E.BadRequest, match="'wait' has the wrong type"):
            c.request("acquire", wait="yes")
        with pytest.raises(E.BadRequest, match="'gpu' has the wrong type"):
            c.request("apply_layout", gpu="0", layout="7x1g.10gb")
        with pytest.raises(E.BadRequest, match="idle_timeout must be positive seconds, got -1"):
            c.acquire(wait=False, idle_timeout=-1)
        with pytest.raises(E.BadRequest, match="tag is 201 characters long"):
            c.acquire(wait=False, tag="x" * 201)
        with pytest.raises(E.BadRequest, match="'tag' has the wrong type"):
            c.request("leases", tag=7)
        with pytest.raises(E.BadRequest, match="'spill' has the wrong type"):
            c.request("release", lease_id=c.acquire(wait=False)["id"], spill="yes")
        assert c.leases() and count(c.status(), "leased") == 1


def test_oversized_message_does_not_hurt_the_broker(raw) -> None:
    broker, sock, info = raw
    sock.send_multipart(encode("status", {"junk": "x" * (16 * 2**20)}, info.key_bytes))
    with broker.client() as c:
        assert count(c.status(), "free") == 2


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        ("H100-80GB:3g.40gb,3g.40gb,1g.10gb", "1g.10gb"),
        ("H100-80GB:4g.40gb,4g.40gb", "4g.40gb"),
        ("H100-80GB:9g.90gb", "9g.90gb"),
        ("B300:1g.10gb", "B300"),
    ],
)
def test_impossible_layout_exits_non_zero_naming_why(
    tmp_path: Path, layout: str, reason: str
) -> None:
    result = run_cli(
        "broker", "--backend", "sim", "--sim-layout", layout, "--state-dir", str(tmp_path / "s")
    )
    assert result.returncode != 0
    assert reason in result.stderr and "error" in result.stderr


def test_unusable_state_dir_exits_non_zero(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("broker", "--backend", "sim", "--state-dir", str(blocker / "state"))
    assert result.returncode == 2
    assert "state dir" in result.stderr and "not usable" in result.stderr


def test_second_broker_on_one_state_dir_is_refused(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb")
    result = run_cli("broker", "--backend", "sim", "--state-dir", str(broker.state_dir))
    assert result.returncode == 2 and "another broker" in result.stderr
    assert count(broker.status(), "free") == 1


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    result = run_cli("broker", "--backend", "cuda", "--state-dir", str(tmp_path / "s"))
    assert result.returncode != 0 and "backend" in result.stderr
