"""``mig-kernel status``, ``metrics``, ``drain`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from mig_kernel.testing import run_cli


def cli(broker_file: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"MIG_KERNEL_BROKER": str(broker_file)})


def test_status_table_and_json(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:3g.40gb,2g.20gb,1g.10gb,1g.10gb")
    with broker.client() as c:
        lease = c.acquire("2g.20gb")
        table = cli(broker.connection_file, "status")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:4] == ["SLICE", "GPU", "PROFILE", "ISOLATION"]
        row = next(line for line in lines if "2g.20gb" in line)
        assert "leased" in row and "(you)" in row
        assert "queue: 0 waiting" in table.stdout
        data = json.loads(cli(broker.connection_file, "status", "--json").stdout)
        assert {s["profile"] for s in data["slices"]} == {"3g.40gb", "2g.20gb", "1g.10gb"}
        assert data["queue"] == []
        c.release(lease["id"])


def test_status_without_a_broker_says_so(tmp_path: Path) -> None:
    result = cli(tmp_path / "nothing.json", "status")
    assert result.returncode == 1
    assert "no broker connection file" in result.stderr


def test_metrics_are_prometheus_text(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:2x1g.10gb")
    with broker.client() as c:
        c.release(c.acquire()["id"])
    text = cli(broker.connection_file, "metrics").stdout
    for name in (
        'mig_kernel_slices{state="free"}',
        "mig_kernel_queue_length",
        "mig_kernel_grant_latency_seconds_bucket",
        "mig_kernel_leases_granted_total 1.0",
        "mig_kernel_leases_released_total 1.0",
    ):
        assert name in text


def test_drain_undrain_and_usage_errors(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:2x1g.10gb")
    assert cli(broker.connection_file, "drain", "gpu0-s0").returncode == 0
    broker.wait_for(lambda s: any(x["state"] == "draining" for x in s["slices"]))
    assert cli(broker.connection_file, "undrain", "gpu0-s0").returncode == 0
    bad = cli(broker.connection_file, "drain")
    assert bad.returncode == 2 and "usage" in bad.stderr
    missing = cli(broker.connection_file, "drain", "gpu7-s7")
    assert missing.returncode == 1 and "no slice 'gpu7-s7'" in missing.stderr


def test_apply_layout_on_the_simulated_gpu(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:7x1g.10gb")
    refused = cli(broker.connection_file, "apply-layout", "0", "3g.40gb,3g.40gb,1g.10gb")
    assert refused.returncode == 1 and "1g.10gb" in refused.stderr
    broker.wait_for(lambda s: sum(x["state"] == "free" for x in s["slices"]) == 7)
    done = cli(broker.connection_file, "apply-layout", "0", "3g.40gb,2g.20gb,1g.10gb,1g.10gb")
    assert done.returncode == 0, done.stderr
    status = broker.wait_for(
        lambda s: len(s["slices"]) == 4 and all(x["state"] == "free" for x in s["slices"])
    )
    assert sorted(x["profile"] for x in status["slices"]) == [
        "1g.10gb",
        "1g.10gb",
        "2g.20gb",
        "3g.40gb",
    ]


def test_apply_layout_refuses_a_gpu_in_use(make_broker) -> None:
    broker = make_broker(layout="H100-80GB:7x1g.10gb")
    with broker.client() as c:
        lease = c.acquire()
        result = cli(broker.connection_file, "apply-layout", "0", "7g.80gb")
        assert result.returncode == 1 and "in use" in result.stderr
        assert c.heartbeat([lease["id"]])[lease["id"]]["state"] == "active"
        c.release(lease["id"])


def test_metrics_can_be_scraped_over_http(make_broker) -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    broker = make_broker(f"--Broker.metrics_port={port}", layout="H100-80GB:2x1g.10gb")
    with broker.client() as c:
        c.release(c.acquire()["id"])
    broker.wait_for(lambda s: all(x["state"] == "free" for x in s["slices"]))
    deadline = time.monotonic() + 5  # gauges follow state changes within publish_interval
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        if 'mig_kernel_slices{state="free"} 2.0' in text or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert 'mig_kernel_slices{state="free"} 2.0' in text
    assert "mig_kernel_leases_granted_total 1.0" in text
