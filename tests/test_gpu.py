"""On a real NVIDIA GPU: read-only NVML discovery, and the broker leasing `process` slices whose
executors warm up CuPy (several executors sharing one GPU). MIG instances are never created
here: MIG creation is tested against tests/fakes/fake_pynvml.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import mig_kernel
from mig_kernel import remote


def _gpu_reason() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception as exc:
        return f"no NVIDIA driver/GPU here (NVML: {type(exc).__name__})"
    if count == 0:
        return "NVML finds no GPU"
    try:
        import cupy

        if not cupy.cuda.is_available():
            return "CuPy finds no CUDA device"
    except ImportError:
        return "CuPy is not installed"
    return None


REASON = _gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]
RECORD = os.environ.get("MIG_KERNEL_GPU_RECORD")  # a directory to write what was seen


def record(name: str, data: object) -> None:
    if RECORD:
        Path(RECORD).mkdir(parents=True, exist_ok=True)
        (Path(RECORD) / name).write_text(json.dumps(data, indent=1, default=str))


def test_nvml_discovery_is_read_only_and_honest_about_isolation() -> None:
    from mig_kernel.slices import make_inventory

    inventory = make_inventory("nvml")
    try:
        gpus = [g.to_json() for g in inventory.gpus()]
        slices = [s.to_json() for s in inventory.slices()]
        shared = make_inventory("nvml", share=2)
        shared_slices = [s.to_json() for s in shared.slices()]
        shared.close()
    finally:
        inventory.close()
    record("nvml-discovery.json", {"gpus": gpus, "slices": slices, "share2": shared_slices})
    assert gpus and slices
    for gpu, entry in zip(gpus, slices, strict=False):
        if not gpu["mig_enabled"]:
            assert entry["isolation"] == "process" and entry["uuid"].startswith("GPU-")
            assert entry["env"]["CUDA_VISIBLE_DEVICES"] == gpu["uuid"]
        else:
            assert entry["isolation"] == "mig" and entry["uuid"].startswith("MIG-")
    assert len(shared_slices) == 2 * len([g for g in gpus if not g["mig_enabled"]]) or any(
        g["mig_enabled"] for g in gpus
    )


def test_two_executors_share_one_gpu_in_process_isolation(tmp_path: Path) -> None:
    from mig_kernel.testing import BrokerProcess, all_free

    broker = BrokerProcess(
        tmp_path / "state", ["--backend", "nvml", "--share", "2", "--per-user-limit", "2"]
    )
    broker.start()
    try:
        status = broker.wait_for(all_free, timeout=180)
        record("broker-status-share2.json", status)
        assert len(status["slices"]) >= 2
        assert {s["isolation"] for s in status["slices"]} == {"process"}
        first = mig_kernel.connect(broker=broker.connection_file)
        second = mig_kernel.connect(broker=broker.connection_file)
        try:
            pings = [first.ping(), second.ping()]
            record("executor-pings.json", pings)
            assert pings[0]["pid"] != pings[1]["pid"]
            for session, info in zip((first, second), pings, strict=True):
                assert info["runtime"] == "cupy" and info["warm_seconds"] > 0
                assert info["device"]["pool_limit"] == session.memory_total  # the cap is set
                assert info["cuda_visible_devices"].startswith("GPU-")
            assert first.slice["id"] != second.slice["id"]
        finally:
            first.release()
            second.release()
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def gpu_broker(tmp_path_factory):
    from mig_kernel.testing import BrokerProcess, all_free

    broker = BrokerProcess(
        tmp_path_factory.mktemp("gpu") / "state",
        ["--backend", "nvml", "--share", "2", "--per-user-limit", "2"],
    )
    broker.start()
    broker.wait_for(all_free, timeout=180)
    yield broker
    broker.stop()


@pytest.fixture
def gpu_session(gpu_broker):
    session = mig_kernel.connect(broker=gpu_broker.connection_file)
    yield session
    session.close()


def test_cupy_results_match_numpy(gpu_session) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 256)).astype(np.float32)
    b = rng.standard_normal((256, 128)).astype(np.float32)

    def fn(a, b):
        return xp.abs(xp.fft.rfft(a @ b, axis=0)), type(a).__module__  # noqa: F821

    result, module = gpu_session.run(fn, a, b)
    assert module.startswith("cupy")
    np.testing.assert_allclose(
        result.get(), np.abs(np.fft.rfft(a @ b, axis=0)), rtol=2e-3, atol=2e-3
    )


def test_large_transfer_through_the_pinned_arena_is_exact(gpu_session) -> None:
    import numpy as np

    big = np.random.default_rng(1).integers(0, 2**31, size=64 * 2**20, dtype=np.int32)  # 256 MiB
    invocation = gpu_session.submit(lambda a: a + 1, big, to_host=True)
    back = invocation.result()
    np.testing.assert_array_equal(back, big + 1)
    record("gpu-256mib-timings.json", invocation.timings)
    assert invocation.timings["input_bytes"] == big.nbytes


def test_memory_cap_of_a_process_slice(gpu_session) -> None:
    cap = gpu_session.memory_total

    def too_big():
        return xp.empty(cap + 2**30, dtype=xp.uint8)  # noqa: F821

    # The same wording as a sim slice's cap (tests/test_dataplane.py).
    with pytest.raises(
        MemoryError, match=r"^slice memory cap exceeded: cap \d+\.\d\d GiB, in use .* GiB, this "
    ) as failed:
        gpu_session.run(too_big)
    assert f"this needs {(cap + 2**30) / 2**30:.2f} GiB more" in str(failed.value)
    assert gpu_session.run(lambda: int(xp.arange(10).sum())) == 45  # noqa: F821


def test_raw_cuda_kernel_launch_and_call_level_remoting(gpu_session) -> None:
    import numpy as np

    source = r"""
    extern "C" __global__ void twice(float* x, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) x[i] *= 2.0f;
    }"""
    x = gpu_session.put(np.arange(1000, dtype=np.float32))
    gpu_session.launch(source, "twice", (4,), (256,), (x, np.int32(1000)))
    np.testing.assert_array_equal(x.get(), np.arange(1000, dtype=np.float32) * 2)


def test_two_tenants_compute_at_once_on_one_gpu(gpu_broker) -> None:
    import threading

    import numpy as np

    sessions = [mig_kernel.connect(broker=gpu_broker.connection_file) for _ in range(2)]
    results: list[float] = []

    def work(session) -> None:
        results.append(
            session.run(
                lambda n: float((xp.ones((n, n)) @ xp.ones((n, n))).sum()),  # noqa: F821
                2048,
            )
        )

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sessions:
        s.release()
    assert results == [2048.0**3] * 2
    assert np.isfinite(results).all()


def test_torch_model_stays_on_the_slice(gpu_session) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed on this machine")
    import numpy as np

    def load():
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU()).cuda().eval()

    def infer(model, x):
        import torch

        with torch.no_grad():
            return model(torch.as_tensor(x, device="cuda")).cpu().numpy()

    model = gpu_session.run(load)
    assert isinstance(model, mig_kernel.RemoteObject) and "torch" in model.type_name
    x = np.ones((4, 64), dtype=np.float32)
    first = gpu_session.run(infer, model, x)
    second = gpu_session.run(infer, model, x)  # the weights were loaded once
    assert first.shape == (4, 32)
    np.testing.assert_array_equal(first, second)
    assert torch is not None


def test_idle_reclaim_spills_and_restores_device_arrays(tmp_path: Path) -> None:
    import time

    import numpy as np

    from mig_kernel.testing import BrokerProcess, all_free

    broker = BrokerProcess(
        tmp_path / "state",
        [
            "--backend",
            "nvml",
            "--idle-timeout",
            "2",
            "--Broker.stats_interval=0.3",
            "--Broker.heartbeat_interval=0.5",
        ],
    )
    broker.start()
    try:
        broker.wait_for(all_free, timeout=180)
        seen: list[dict] = []
        session = mig_kernel.connect(broker=broker.connection_file, on_reacquire=seen.append)
        data = np.random.default_rng(3).random((1024, 1024), dtype=np.float32)
        kept = session.run(lambda a: a * 3, data)
        deadline = time.monotonic() + 30
        while session.ended != "idle" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session.ended == "idle"
        np.testing.assert_allclose(kept.get(), data * 3)  # restored on a fresh executor
        record("gpu-spill-restore.json", seen)
        assert seen and seen[0]["restored"] == 1
        session.release()
    finally:
        broker.stop()


SPIN_KERNEL = r"""
extern "C" __global__ void spin(long long ns) {
    long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""


def test_a_long_gpu_call_rehearses_what_follows_and_changes_nothing(gpu_session) -> None:
    """While a call's GPU work runs, the executor rehearses the steps after it (polling the
    stream, executor/dataplane.py); the call and the next ones come back as without it."""
    import numpy as np

    def spin_then_double(a, ns, source):
        kernel = xp.RawKernel(source, "spin")  # noqa: F821 (xp: the slice's CuPy)
        kernel((1,), (1,), (ns,))
        return a * 2

    a = gpu_session.put(np.arange(1000, dtype=np.float32))
    conn = gpu_session._connection()
    echoes = conn.echoes
    invocation = gpu_session.submit(spin_then_double, a, 20_000_000, SPIN_KERNEL)
    doubled = invocation.result()
    np.testing.assert_array_equal(doubled.get(), np.arange(1000, dtype=np.float32) * 2)
    rehearsals = invocation.timings.get("rehearsals", 0)
    assert rehearsals >= 10, invocation.timings  # every 200 us of a 20 ms kernel
    if remote.SPIN >= 0.02:  # the client spins through it (8 CPUs or more): it rehearses too
        assert conn.echoes >= echoes + 10, (conn.echoes, echoes)  # round trips, answered
    assert not conn.replies and not conn.pending
    again = gpu_session.submit(spin_then_double, doubled, 5_000_000, SPIN_KERNEL)
    np.testing.assert_array_equal(again.result().get(), np.arange(1000, dtype=np.float32) * 4)
    record("rehearsals.json", {"20ms": invocation.timings, "5ms": again.timings})


def test_a_gpu_call_leaves_its_lane_served(gpu_session) -> None:
    """While the main thread waits for a call's GPU work, the lanes are its to look at: it
    answers the client's echoes and wakes the watcher for anything else. A ping and a cancel
    by the lane are served during the call, the next call is staged, and all come back."""
    import time

    import numpy as np

    def spin(ns, source):
        kernel = xp.RawKernel(source, "spin")  # noqa: F821 (xp: the slice's CuPy)
        kernel((1,), (1,), (ns,))

    conn = gpu_session._connection()
    gpu_session.run(spin, 0, SPIN_KERNEL)
    assert conn.lane_active()
    running = gpu_session.submit(spin, 2_000_000_000, SPIN_KERNEL)  # a 2 s kernel
    time.sleep(0.1)
    started = time.monotonic()
    assert gpu_session.ping()["pid"] > 0
    answered = time.monotonic() - started
    following = gpu_session.submit(lambda a: float(a.sum()), np.ones(1000))
    assert conn.cancel(running, grace=5.0)
    cancelled = time.monotonic() - started
    with pytest.raises(KeyboardInterrupt):
        running.result()
    assert following.result() == 1000.0  # after the kernel, which runs on to its end
    assert answered < 0.5 and cancelled < 1.0, (answered, cancelled)
    record("lane-served-during-gpu-call.json", {"ping_s": answered, "cancel_s": cancelled})
