"""The partition picture (``partition_view``), the live ``SliceMonitor`` against real sim
brokers (headless: ipywidgets talks to a recording comm), and ``%gpu monitor`` in a real kernel.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import comm
import pytest
from comm.base_comm import BaseComm, BuffersType, CommManager, MaybeDict

from mig_kernel.partition_view import (
    STATE_FILLS,
    UNKNOWN_FILL,
    contrast,
    render_header,
    render_html,
    text_colour,
)
from mig_kernel.testing import BrokerProcess, wait_until
from mig_kernel.watch import Watcher
from mig_kernel.widgets import SliceMonitor
from tests.support.kernels import Kernels

GiB = 2**30
LAYOUT = "H100-80GB:3g.40gb,2g.20gb,1g.10gb,1g.10gb"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>&'


# -- reading the picture -------------------------------------------------------------------------
class Blocks(HTMLParser):
    """Every element with a ``data-slice`` (or an unused-slot marker): its attributes and the
    text it shows (entities decoded, as a browser would)."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.blocks: dict[str, dict[str, Any]] = {}
        self.unused: list[dict[str, str]] = []
        self._open: list[tuple[str | None, list[str]]] = []  # (slice id or None, text parts)
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = {k: v or "" for k, v in attrs}
        if "mig-slot-unused" in named.get("class", ""):
            self.unused.append(named)
        slice_id = named.get("data-slice")
        if slice_id is not None:
            self.blocks[slice_id] = {**named, "text": []}
        if tag == "div":
            self._open.append((slice_id, []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            slice_id, _ = self._open.pop()
            if slice_id is not None:
                self.blocks[slice_id]["text"] = " ".join(self.blocks[slice_id]["text"])

    def handle_data(self, data: str) -> None:
        for slice_id, _ in self._open:
            if slice_id is not None and data.strip():
                self.blocks[slice_id]["text"].append(data.strip())


def entry(slice_id: str, profile: str, start: int | None, size: int | None, **kw: Any) -> dict:
    memory = {"1g.10gb": 9984, "2g.20gb": 20096, "3g.40gb": 40448}.get(profile, 40960) * 2**20
    return {
        "id": slice_id,
        "uuid": f"MIG-{slice_id}",
        "gpu": 0,
        "profile": profile,
        "isolation": "mig",
        "memory_total": memory,
        "memory_used": 0,
        "busy": None,
        "state": "free",
        "holder": None,
        "mine": False,
        "sms": 16,
        "placement": None if start is None else {"start": start, "size": size},
        "lease": None,
        "broken_reason": None,
        **kw,
    }


H100 = {
    "index": 0,
    "uuid": "GPU-0",
    "name": "NVIDIA H100 80GB HBM3",
    "card": "H100-80GB",
    "memory_total": 85094039552,
    "mig_enabled": True,
    "memory_slots": 8,
    "simulated": False,
}


def h100_state() -> dict[str, Any]:
    """``3g.40gb,2g.20gb,1g.10gb,1g.10gb`` as the placement search lays it out (gpu-facts.md)."""
    return {
        "node": "node-1",
        "backend": "nvml",
        "gpus": [H100],
        "slices": [
            entry("gpu0-s0", "2g.20gb", 0, 2, state="leased", holder=HOSTILE, busy=0.5),
            entry("gpu0-s1", "1g.10gb", 2, 1),
            entry("gpu0-s2", "1g.10gb", 3, 1, state="broken", broken_reason="failed 3x: <boom>"),
            entry(
                "gpu0-s3",
                "3g.40gb",
                4,
                4,
                state="leased",
                holder="user-abc",
                mine=True,
                busy=0.0,
                memory_used=2 * GiB,
                idle_seconds=475.0,
                lease={"id": "L-1", "idle_timeout": 600.0, "expires_in": 125.0},
            ),
        ],
        "queue": [
            {"position": 1, "profile": "3g.40gb", "holder": "user-x", "mine": False},
            {"position": 2, "profile": None, "holder": "user-abc", "mine": True},
        ],
    }


# -- render_html ------------------------------------------------------------------------------
def test_mig_layout_is_drawn_on_its_memory_slots() -> None:
    markup = render_html(h100_state())
    blocks = Blocks(markup).blocks
    assert list(blocks) == ["gpu0-s0", "gpu0-s1", "gpu0-s2", "gpu0-s3"]  # slot order
    expected = {"gpu0-s0": (0, 2), "gpu0-s1": (2, 1), "gpu0-s2": (3, 1), "gpu0-s3": (4, 4)}
    for slice_id, (start, size) in expected.items():
        block = blocks[slice_id]
        assert (block["data-slot-start"], block["data-slot-size"]) == (str(start), str(size))
        assert f"grid-column:{start + 1} / span {size};" in block["style"]
    assert "grid-template-columns:repeat(8,minmax(0,1fr))" in markup  # the card's 8 slots
    assert Blocks(markup).unused == []  # this layout uses every slot
    assert "H100-80GB" in markup and "MIG, 8 memory slots" in markup

    texts = {k: b["text"] for k, b in blocks.items()}
    assert texts["gpu0-s1"] == "1g.10gb free mig 0.00/9.75 GiB"  # a free slice: two lines
    assert "2g.20gb" in texts["gpu0-s0"] and "leased" in texts["gpu0-s0"]
    assert "computing 50%" in texts["gpu0-s0"] and "mig-computing" in blocks["gpu0-s0"]["class"]
    assert texts["gpu0-s0"].count("GiB") == 1  # one memory line
    assert "broken" in texts["gpu0-s2"] and "failed 3x: <boom>" in texts["gpu0-s2"]
    assert texts["gpu0-s3"] == "3g.40gb leased mig yours 2.00/39.50 GiB idle 2:05"
    assert "gpu0-s1" in blocks["gpu0-s1"]["title"]  # the id, in the tooltip
    assert "queue: 2 waiting (1 yours)" in markup


def test_own_slice_is_highlighted_and_others_show_the_pseudonym_escaped() -> None:
    markup = render_html(h100_state())
    blocks = Blocks(markup).blocks
    mine, theirs = blocks["gpu0-s3"], blocks["gpu0-s0"]
    assert "mig-mine" in mine["class"].split() and "border:2px dashed" in mine["style"]
    assert "mig-mine" not in theirs["class"].split() and "border:1px solid" in theirs["style"]
    assert [k for k, b in blocks.items() if "yours" in b["text"]] == ["gpu0-s3"]
    # the slice of the notebook viewing it: "this notebook", apart from the user's others
    this = Blocks(render_html(h100_state(), this_slice="gpu0-s3")).blocks["gpu0-s3"]
    assert "mig-this" in this["class"].split() and "border:3px solid" in this["style"]
    assert "this notebook" in this["text"] and "yours" not in this["text"]
    # the hostile holder is shown as text, never as markup
    assert "<script>" not in markup and "<img" not in markup and "<boom>" not in markup
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in markup
    assert HOSTILE in theirs["text"]
    assert "user-abc" not in mine["text"]  # the viewer sees "yours", not its own pseudonym


def test_idle_countdown_ticks_from_the_time_the_state_arrived() -> None:
    state = {**h100_state(), "received_at": 1000.0}
    mine = Blocks(render_html(state, now=1010.0)).blocks["gpu0-s3"]
    assert "idle 1:55" in mine["text"]  # 125 s - 10 s: time left, as in the panel
    # a watch state: no expires_in, the timeout the display knows, and the idle time
    state["slices"][3] = {**state["slices"][3], "lease": {"idle_timeout": 600.0}}
    state["slices"][3]["idle_seconds"] = 30.0
    assert "idle 9:20" in Blocks(render_html(state, now=1010.0)).blocks["gpu0-s3"]["text"]
    state["slices"][3]["lease"] = {"idle_timeout": 0}
    assert "no idle release" in Blocks(render_html(state, now=1010.0)).blocks["gpu0-s3"]["text"]
    state["slices"][3]["lease"] = None  # timeout unknown: the idle time, counting up
    assert "idle for 0:40" in Blocks(render_html(state, now=1010.0)).blocks["gpu0-s3"]["text"]


def test_every_state_has_a_label_and_readable_mid_tone_colours() -> None:
    states = [*STATE_FILLS, "resizing"]  # and one this version does not know
    slices = [entry(f"gpu0-s{i}", "1g.10gb", i, 1, state=s) for i, s in enumerate(states)]
    blocks = Blocks(render_html({"gpus": [H100], "slices": slices, "queue": []})).blocks
    for i, state in enumerate(states):
        block = blocks[f"gpu0-s{i}"]
        assert block["data-state"] == state and state in block["text"].split()
        fill = STATE_FILLS.get(state, UNKNOWN_FILL)
        assert f"background:{fill};color:{text_colour(fill)};" in block["style"]
        assert contrast(fill, text_colour(fill)) >= 4.5  # text on the fill (WCAG AA)
        assert contrast(fill, "#ffffff") >= 2.0 and contrast(fill, "#111111") >= 4.5  # both themes
    assert len({STATE_FILLS[s] for s in STATE_FILLS}) == len(STATE_FILLS)
    markup = render_html({"gpus": [H100], "slices": slices, "queue": []})
    unused = Blocks(markup).unused
    assert [u["data-slot-start"] for u in unused] == ["6", "7"]  # six instances on 8 slots
    assert markup.count(">unallocated</div>") == 2  # the side panel's word


def test_process_shares_are_equal_parts_and_slot_counts_come_from_the_card_table() -> None:
    gpu = {**H100, "mig_enabled": False, "memory_slots": 0, "card": None}
    shares = [
        entry(f"gpu0-s{i}", "gpu-1of2.40gb", None, None, isolation="process") for i in range(2)
    ]
    markup = render_html({"gpus": [gpu], "slices": shares, "queue": []})
    blocks = Blocks(markup).blocks
    assert "grid-template-columns:repeat(2,minmax(0,1fr))" in markup
    assert [b["style"].split(";")[0] for b in blocks.values()] == [
        "grid-column:1 / span 1",
        "grid-column:2 / span 1",
    ]
    assert all("data-slot-start" not in b for b in blocks.values())
    assert "process" in blocks["gpu0-s0"]["text"] and "MIG off" in markup
    # a simulated A100 whose GPU entry lacks the slot count: 8, from the A100-40GB table
    sim_gpu = {"index": 0, "card": "A100-40GB", "simulated": True}
    markup = render_html({"gpus": [sim_gpu], "slices": [entry("gpu0-s0", "1g.5gb", 0, 1)]})
    assert "simulated, 8 memory slots" in markup and len(Blocks(markup).unused) == 7


def test_header_names_node_backend_update_time_and_queue() -> None:
    header = render_header(
        {**h100_state(), "node": "<n>"}, updated=time.mktime((2024, 1, 2, 3, 4, 5, 0, 0, -1))
    )
    assert "&lt;n&gt;" in header and "nvml" in header and "03:04:05" in header
    assert "queue: 2 waiting (1 yours)" in header


# -- SliceMonitor against a real broker ---------------------------------------------------------
class RecordingComm(BaseComm):
    """A comm without a kernel that keeps what the widget would send to the frontend."""

    def __init__(self, **kwargs: Any) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        super().__init__(**kwargs)

    def publish_msg(
        self,
        msg_type: str,
        data: MaybeDict = None,
        metadata: MaybeDict = None,
        buffers: BuffersType = None,
        **keys: Any,
    ) -> None:
        self.messages.append((msg_type, data or {}))

    def values_sent(self) -> list[str]:
        return [
            d["state"]["value"]
            for kind, d in self.messages
            if kind == "comm_msg" and d.get("method") == "update" and "value" in d["state"]
        ]


@pytest.fixture
def comms(monkeypatch: pytest.MonkeyPatch) -> dict[str, RecordingComm]:
    """Headless widgets (jupyter-facts.md): ipywidgets gets its comms from ``comm.create_comm``,
    here recording ones, so widgets work outside a kernel and tests see what would be sent."""
    made: dict[str, RecordingComm] = {}
    manager = CommManager()

    def create(**kwargs: Any) -> RecordingComm:
        created = RecordingComm(**kwargs)
        made[created.comm_id] = created
        return created

    monkeypatch.setattr(comm, "create_comm", create)
    monkeypatch.setattr(comm, "get_comm_manager", lambda: manager)
    return made


@pytest.fixture
def make_monitor(comms: dict[str, RecordingComm]) -> Iterator[Callable[..., SliceMonitor]]:
    made: list[SliceMonitor] = []

    def make(connection_file: Path, **kwargs: Any) -> SliceMonitor:
        monitor = SliceMonitor(connection_file, **kwargs)
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.close()


def states_of(monitor: SliceMonitor) -> dict[str, str]:
    return {k: b["data-state"] for k, b in Blocks(monitor.picture.value).blocks.items()}


def test_monitor_starts_free_and_follows_another_users_lease(
    make_broker: Callable[..., BrokerProcess],
    make_monitor: Callable[..., SliceMonitor],
    comms: dict[str, RecordingComm],
) -> None:
    broker = make_broker(layout=LAYOUT, multi_user=True)
    monitor = make_monitor(broker.connection_file)
    assert states_of(monitor) == {f"gpu0-s{i}": "free" for i in range(4)}
    assert monitor.updates == 0 and "sim" in monitor.header.value
    assert "mig-monitor" in monitor._dom_classes
    picture_comm = comms[monitor.picture.model_id]
    with broker.client("bob") as bob:
        lease = bob.acquire("2g.20gb", wait=False)
        started = time.monotonic()
        wait_until(
            lambda: monitor.updates > 0 and states_of(monitor)[lease["slice"]["id"]] == "leased",
            timeout=10,
        )
        assert time.monotonic() - started < 5.0
    block = Blocks(monitor.picture.value).blocks[lease["slice"]["id"]]
    assert "user-" in block["text"] and "yours" not in block["text"] and "bob" not in block["text"]
    # the change went to the frontend through the comm, not only into the Python object
    assert any('data-state="leased"' in value for value in picture_comm.values_sent())


def test_own_idle_countdown_ticks_between_publications(
    make_broker: Callable[..., BrokerProcess], make_monitor: Callable[..., SliceMonitor]
) -> None:
    # stats every 60 s: no memory/busy publications, so a changing countdown is the tick's
    broker = make_broker("--Broker.stats_interval=60", layout=LAYOUT)
    monitor = make_monitor(broker.connection_file)
    with broker.client() as client:
        lease = client.acquire("1g.10gb", wait=False, idle_timeout=300)
        slice_id = lease["slice"]["id"]

        def countdown() -> str | None:
            text = Blocks(monitor.picture.value).blocks[slice_id]["text"]
            clock = re.search(r"idle (\d+:\d\d)", text)
            return clock.group(1) if clock else None

        first = wait_until(countdown, timeout=10, what="countdown shown")
        assert "yours" in Blocks(monitor.picture.value).blocks[slice_id]["text"]
        updates = monitor.updates
        wait_until(lambda: countdown() not in (None, first), timeout=5, what="countdown ticked")
        assert monitor.updates == updates  # redrawn without a new state
        assert first.startswith("4:") or first == "5:00"  # 300 s timeout, just granted


def test_quick_changes_are_coalesced_and_end_on_the_last_state(
    make_broker: Callable[..., BrokerProcess], make_monitor: Callable[..., SliceMonitor]
) -> None:
    broker = make_broker(
        "--Broker.publish_interval=0.01",
        "--Broker.stats_interval=60",
        layout="H100-80GB:7x1g.10gb",
        multi_user=True,
    )
    monitor = make_monitor(broker.connection_file, max_rate=2.0)
    with Watcher(broker.connection_file) as counter, broker.client("bob") as bob:
        publications = 0

        def seen(leased: int) -> dict[str, Any]:
            """Count publications until one shows ``leased`` slices leased (so each change below
            is published, not merged by the broker, and the counter is subscribed)."""
            nonlocal publications
            for _ in range(100):
                state = counter.receive(timeout=5.0)
                assert state is not None, "no publication within 5 s"
                publications += 1
                if sum(x["state"] == "leased" for x in state["slices"]) == leased:
                    return state
            raise AssertionError("no matching publication in 100")

        started = time.monotonic()
        for _ in range(30):
            lease = bob.acquire(wait=False)
            seen(1)
            bob.release(lease["id"])
            seen(0)
        final = bob.acquire(wait=False)
        last = seen(1)
        while (state := counter.receive(timeout=1.0)) is not None:  # until the node is quiet
            publications += 1
            last = state
        elapsed = time.monotonic() - started
        wait_until(lambda: monitor.state.get("seq") == last["seq"], timeout=5, what="last state")
    assert publications >= 61
    assert monitor.updates <= 2.0 * (time.monotonic() - started) + 2
    assert monitor.updates * 4 <= publications, (monitor.updates, publications, elapsed)
    leased = {k for k, v in states_of(monitor).items() if v == "leased"}
    assert leased == {final["slice"]["id"]}


def test_close_stops_the_thread_and_the_socket_within_a_second(
    make_broker: Callable[..., BrokerProcess],
    make_monitor: Callable[..., SliceMonitor],
    comms: dict[str, RecordingComm],
) -> None:
    broker = make_broker(layout=LAYOUT)
    with pytest.raises(ValueError, match="max_rate"):
        SliceMonitor(broker.connection_file, max_rate=0)
    monitor = make_monitor(broker.connection_file)
    thread, model = monitor._thread, comms[monitor.model_id]
    assert thread is not None and thread.is_alive()
    started = time.monotonic()
    monitor.close()
    assert time.monotonic() - started < 1.0
    assert not thread.is_alive() and monitor.watcher.socket.closed and monitor.closed
    assert model.messages[-1][0] == "comm_close" and monitor.comm is None
    monitor.close()  # twice: harmless
    assert monitor.closed and not thread.is_alive()


# -- %gpu monitor in a real kernel ---------------------------------------------------------------
@pytest.fixture
def kernels(tmp_path: Path) -> Iterator[Kernels]:
    made = Kernels(tmp_path / "kernels")
    yield made
    made.stop_all()


def test_gpu_monitor_magic_displays_a_slice_monitor(
    make_broker: Callable[..., BrokerProcess],
    kernels: Kernels,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = make_broker(layout=LAYOUT, multi_user=True)
    monkeypatch.setenv("MIG_KERNEL_BROKER", str(broker.connection_file))
    kernel = kernels.start(kernels.spec("mig-any"))
    messages: list[dict[str, Any]] = []
    reply = kernel.client.execute_interactive(
        "%gpu monitor", timeout=60, output_hook=messages.append
    )
    assert reply["content"]["status"] == "ok"
    assert not [m for m in messages if m["msg_type"] == "error"]
    [shown] = [m["content"]["data"] for m in messages if m["msg_type"] == "display_data"]
    view = shown["application/vnd.jupyter.widget-view+json"]
    opened = {
        m["content"]["comm_id"]: m["content"]["data"]["state"]
        for m in messages
        if m["msg_type"] == "comm_open"
    }
    model = opened[view["model_id"]]
    assert model["_model_name"] == "VBoxModel" and "mig-monitor" in model["_dom_classes"]
    _header_id, picture_id = (child.removeprefix("IPY_MODEL_") for child in model["children"])
    assert 'data-state="leased"' in opened[picture_id]["value"]  # the kernel's own slice
    assert "this notebook" in opened[picture_id]["value"]
    check = kernel.run(
        "import ipywidgets.widgets.widget as w\n"
        f"print(type(w._instances[{view['model_id']!r}]).__name__)"
    )
    assert check.stdout == "SliceMonitor\n", check.traceback

    # another user's lease reaches the notebook from the monitor's thread
    with broker.client("alice") as alice:
        theirs = alice.acquire(wait=False)
        deadline = time.monotonic() + 10
        while True:
            msg = kernel.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            data = msg["content"].get("data", {})
            if (
                msg["msg_type"] == "comm_msg"
                and msg["content"]["comm_id"] == picture_id
                and data.get("method") == "update"
            ):
                blocks = Blocks(data["state"].get("value", "")).blocks
                if blocks.get(theirs["slice"]["id"], {}).get("data-state") == "leased":
                    break
    again: list[dict[str, Any]] = []
    kernel.client.execute_interactive("%gpu monitor", timeout=60, output_hook=again.append)
    [shown_again] = [m["content"]["data"] for m in again if m["msg_type"] == "display_data"]
    assert shown_again["application/vnd.jupyter.widget-view+json"]["model_id"] == view["model_id"]
