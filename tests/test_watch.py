"""The broker's watch stream through ``mig_kernel.watch.Watcher``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from mig_kernel.testing import BrokerProcess
from mig_kernel.watch import Watcher
from mig_kernel.wire.messages import encode


def next_state(watcher: Watcher, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    for _ in range(100):
        state = watcher.receive(timeout=5.0)
        assert state is not None, "no publication within 5 s"
        if predicate(state):
            return state
    raise AssertionError("no matching publication in 100")


def test_watcher_sees_leases_with_the_viewers_own_marked(
    make_broker: Callable[..., BrokerProcess],
) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb,1g.10gb", multi_user=True)
    with Watcher(broker.connection_file) as watcher, broker.client("alice") as alice:
        assert [s["state"] for s in watcher.initial["slices"]] == ["free", "free"]
        with broker.client("bob") as bob:
            theirs = bob.acquire(wait=False)
            state = next_state(watcher, lambda s: any(x["state"] == "leased" for x in s["slices"]))
            [leased] = [x for x in state["slices"] if x["state"] == "leased"]
            assert leased["id"] == theirs["slice"]["id"]
            assert leased["holder"].startswith("user-") and not leased["mine"]
            assert "bob" not in str(state) and leased["lease"] is None
            seq = state["seq"]
        with Watcher(broker.connection_file) as own:  # the watcher runs as the OS user
            assert own.pseudonym != leased["holder"]
        mine = alice.acquire(wait=False)
        state = next_state(
            watcher,
            lambda s: sum(x["state"] == "leased" for x in s["slices"]) == 2 and s["seq"] > seq,
        )
        assert watcher.seq == state["seq"]
        assert (
            next(x for x in state["slices"] if x["id"] == mine["slice"]["id"])["holder"]
            == (alice.watch_info()["pseudonym"])
        )


def test_forged_publication_is_skipped(
    make_broker: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    broker = make_broker(layout="H100-80GB:1g.10gb")
    forger = zmq.Context.instance().socket(zmq.PUB)
    forger.linger = 0
    endpoint = f"ipc://{tmp_path}/forger.sock"
    forger.bind(endpoint)
    try:
        with Watcher(broker.connection_file) as watcher:
            watcher.socket.connect(endpoint)  # a second publisher the watcher hears
            key = watcher.key

            def publish(body: dict[str, Any], signing_key: bytes) -> None:
                forger.send_multipart(
                    [b"state", *encode("state", body, signing_key, sender="broker")]
                )

            for _ in range(100):  # until the subscription reaches this publisher
                publish({"slices": [], "seq": 1}, key)
                if watcher.receive(timeout=0.05) is not None:
                    break
            else:
                raise AssertionError("the watcher never heard the second publisher")
            publish({"slices": [], "seq": 99}, b"k" * 32)  # forged: wrong key
            forger.send_multipart([b"state", b"", b"\x80", b""])  # malformed
            publish({"slices": [], "seq": 5}, key)
            assert watcher.receive(timeout=2.0) is None
            assert watcher.receive(timeout=2.0) is None
            assert watcher.receive(timeout=2.0) == {"slices": [], "seq": 5}
            assert watcher.seq == 5
    finally:
        forger.close(linger=0)


def test_busy_share_and_memory_are_published(make_broker: Callable[..., BrokerProcess]) -> None:
    import mig_kernel

    broker = make_broker("--Broker.stats_interval=0.3", layout="H100-80GB:1g.10gb")
    with Watcher(broker.connection_file) as watcher:
        session = mig_kernel.connect(broker=broker.connection_file)
        try:
            kept = session.run(lambda: xp.ones(2**20))  # noqa: F821 (xp: the slice's module)

            def busy_for(seconds: float) -> None:
                import time

                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    pass

            for _ in range(3):
                session.run(busy_for, 0.5)
            state = next_state(watcher, lambda s: (s["slices"][0]["busy"] or 0) > 0.3)
            assert state["slices"][0]["memory_used"] >= kept.nbytes
            assert state["slices"][0]["mine"]
        finally:
            session.release()
