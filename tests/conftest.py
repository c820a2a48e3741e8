from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mig_kernel.testing import BrokerProcess, all_free

REPO = Path(__file__).resolve().parents[1]
IDENTITY = "--Broker.identity_provider_class=tests.support.identity.ClaimedUserIdentity"
CLAIMED_ADMIN = "--LeasePolicy.admin_users=admin"  # the user name ClaimedUserIdentity tests use


@pytest.fixture(autouse=True, scope="session")
def private_gpu_locks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Brokers this run starts without a lock dir of their own (`mig-kernel lab`'s) lock
    their GPUs in a directory of the run, not the node's /run/lock: a developer's `make run`
    or another test run on the same simulated GPU must not make them refuse to start."""
    previous = os.environ.get("MIG_KERNEL_LOCK_DIR")
    os.environ["MIG_KERNEL_LOCK_DIR"] = str(tmp_path_factory.mktemp("gpu-locks"))
    yield
    if previous is None:
        os.environ.pop("MIG_KERNEL_LOCK_DIR", None)
    else:
        os.environ["MIG_KERNEL_LOCK_DIR"] = previous


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start real broker processes (sim backend); every one is stopped at teardown."""
    started: list[BrokerProcess] = []

    def make(
        *args: str,
        layout: str = "H100-80GB:7x1g.10gb",
        name: str = "state",
        wait: bool = True,
        multi_user: bool = False,
    ) -> BrokerProcess:
        argv = ["--backend", "sim", "--sim-layout", layout, *args]
        if multi_user:
            argv += [IDENTITY, CLAIMED_ADMIN]
        broker = BrokerProcess(tmp_path / name, argv, pythonpath=(str(REPO),))
        started.append(broker)
        broker.start()
        if wait:
            broker.wait_for(all_free)
        return broker

    yield make
    for broker in started:
        broker.stop()
