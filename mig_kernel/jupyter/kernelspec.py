"""Kernelspecs for the slices a node offers: ``mig-python3`` (any slice) and one per profile.

Each spec launches the mig-kernel IPython kernel through the ``mig-provisioner`` kernel
provisioner, which leases the slice named in the spec's provisioner config before the kernel
starts (or at its first GPU cell with ``acquire: lazy``).

Display names follow one scheme, in the launcher, the notebooks and the docs: what the user
gets, "GPU slice (any)" or "GPU slice 1g.10gb", qualified only where the slice is not a MIG
device: "(simulated)", "(GPU share)", "(whole GPU)". So nobody picks what looks like a MIG slice
and gets a simulation or a shared GPU. The specs carry mig-kernel's own logo.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..client import BrokerClient
from ..wire.errors import MigKernelError

KERNEL_MODULE = "mig_kernel.jupyter.kernel"
PROVISIONER_NAME = "mig-provisioner"
ANY_KERNEL_NAME = "mig-python3"
ACQUIRE_MODES = ("eager", "lazy")
LOGO_FILES = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")
LOGO_DIR = Path(__file__).with_name("resources")  # a chip cut into slices, yours bright
BROKER_TIMEOUT = 2.0  # seconds: a broker that is up answers status in milliseconds

_NAME_OK = re.compile(r"^[a-z0-9._-]+$")
_NOT_NAME = re.compile(r"[^a-z0-9._-]")
_SHARE = re.compile(r"-\d+of\d+\.")  # "gpu-1of2.40gb": one share of a GPU

Profile = tuple[str, str]  # (profile, isolation)


def kernel_name(profile: str | None) -> str:
    """``mig-python3`` for any slice, ``mig-python3-<profile>`` (lower case; characters a
    kernel name may not hold, such as the ``+`` of ``1g.10gb+me``, become ``-``)."""
    if profile is None:
        return ANY_KERNEL_NAME
    name = f"{ANY_KERNEL_NAME}-{_NOT_NAME.sub('-', profile.strip().lower())}"
    if not _NAME_OK.match(name):  # cannot happen after the substitution; kept as the contract
        raise ValueError(f"kernel name {name!r} does not match {_NAME_OK.pattern}")
    return name


def display_name(profile: str, isolation: str) -> str:
    """The launcher's label for one profile: "GPU slice <profile>", qualified unless it is a
    MIG device (whose profile names, 1g.10gb and so on, are MIG's own)."""
    if isolation == "mig":
        return f"GPU slice {profile}"
    if isolation == "sim":
        return f"GPU slice {profile} (simulated)"
    if _SHARE.search(profile):
        return f"GPU slice {profile} (GPU share)"
    return f"GPU slice {profile} (whole GPU)"  # MIG off: isolated only as a process


def any_display_name(isolations: Iterable[str]) -> str:
    """The label of ``mig-python3`` (the smallest free slice): "simulated" when every slice
    it could get is simulated."""
    return "GPU slice (any, simulated)" if set(isolations) == {"sim"} else "GPU slice (any)"


def kernel_json(
    profile: str | None,
    display: str,
    *,
    acquire: str = "eager",
    idle_timeout: float | None = None,
    broker: str | None = None,
) -> dict[str, Any]:
    """The kernel.json of one spec; the provisioner config holds only the keys with values
    (``broker``: the connection file kernels of every user use, on a multi-user node)."""
    if acquire not in ACQUIRE_MODES:
        raise ValueError(f"acquire must be one of {ACQUIRE_MODES}, not {acquire!r}")
    config: dict[str, Any] = {}
    if profile is not None:
        config["profile"] = profile
    config["acquire"] = acquire
    if idle_timeout is not None:
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout must be >= 0 seconds, not {idle_timeout}")
        config["idle_timeout"] = (
            int(idle_timeout) if idle_timeout == int(idle_timeout) else idle_timeout
        )
    if broker is not None:
        config["broker"] = broker
    return {
        "argv": [sys.executable, "-m", KERNEL_MODULE, "-f", "{connection_file}"],
        "display_name": display,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "debugger": True,
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config},
        },
    }


def kernelspec_plan(
    profiles: Sequence[Profile],
    *,
    any_isolations: Iterable[str] | None = None,
    acquire: str = "eager",
    idle_timeout: float | None = None,
    broker: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """(kernel name, kernel.json) of ``mig-python3`` and of each profile, in that order.

    ``any_isolations`` are the isolations ``mig-python3`` may land on (default: those of
    ``profiles``); it differs when only some of the node's profiles get their own spec."""
    isolations = [iso for _, iso in profiles] if any_isolations is None else list(any_isolations)
    plan = [
        (
            ANY_KERNEL_NAME,
            kernel_json(
                None,
                any_display_name(isolations),
                acquire=acquire,
                idle_timeout=idle_timeout,
                broker=broker,
            ),
        )
    ]
    seen = {ANY_KERNEL_NAME}
    for profile, isolation in profiles:
        name = kernel_name(profile)
        if name in seen:
            continue
        seen.add(name)
        spec = kernel_json(
            profile,
            display_name(profile, isolation),
            acquire=acquire,
            idle_timeout=idle_timeout,
            broker=broker,
        )
        plan.append((name, spec))
    return plan


def _write_spec_dir(directory: Path, spec: dict[str, Any]) -> None:
    directory.mkdir()
    (directory / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
    for name in LOGO_FILES:
        if (LOGO_DIR / name).is_file():
            shutil.copyfile(LOGO_DIR / name, directory / name)


def is_mig_kernelspec(directory: Path) -> bool:
    """Whether a kernelspec folder is one of ours (launched through mig-provisioner)."""
    try:
        spec = json.loads((directory / "kernel.json").read_text())
    except (OSError, ValueError):
        return False
    metadata = spec.get("metadata") if isinstance(spec, dict) else None
    provisioner = (metadata or {}).get("kernel_provisioner") or {}
    return provisioner.get("provisioner_name") == PROVISIONER_NAME


def install_kernelspecs(
    profiles: Sequence[Profile],
    *,
    user: bool = False,
    prefix: str | os.PathLike[str] | None = None,
    acquire: str = "eager",
    idle_timeout: float | None = None,
    any_isolations: Iterable[str] | None = None,
    prune: bool = False,
    broker: str | None = None,
) -> list[tuple[str, str]]:
    """Install ``mig-python3`` and one spec per profile; returns (kernel name, path) of each.

    The target is the environment (``prefix=sys.prefix``) unless ``user`` (the Jupyter data
    dir) or another ``prefix`` is given: kernels run this environment's Python, so their specs
    belong to it. A spec of the same name is replaced. ``prune`` also removes our other specs
    (``mig-python3-*`` launched by mig-provisioner) from the target folder: profiles the node
    no longer offers would fail at start.
    """
    # Imported here: jupyter_client takes a quarter second to import, and only installing needs it.
    from jupyter_client.kernelspec import KernelSpecManager

    if user and prefix is not None:
        raise ValueError("give either user=True or a prefix, not both")
    if not user and prefix is None:
        prefix = sys.prefix
    plan = kernelspec_plan(
        profiles,
        any_isolations=any_isolations,
        acquire=acquire,
        idle_timeout=idle_timeout,
        broker=broker,
    )
    # Its "not on the kernel path" warning would come once per spec; callers say it once.
    quiet = logging.getLogger(f"{__name__}.manager")
    quiet.setLevel(logging.ERROR)
    manager = KernelSpecManager(log=quiet)
    installed: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="mig-kernelspec-") as tmp:
        for name, spec in plan:
            source = Path(tmp) / name
            _write_spec_dir(source, spec)
            path = manager.install_kernel_spec(
                str(source),
                kernel_name=name,
                user=user,
                prefix=None if prefix is None else os.fspath(prefix),
            )
            installed.append((name, path))
    if prune and installed:
        kernels_dir = Path(installed[0][1]).parent
        keep = {name for name, _ in installed}
        for other in kernels_dir.glob(f"{ANY_KERNEL_NAME}-*"):
            if other.name not in keep and other.is_dir() and is_mig_kernelspec(other):
                shutil.rmtree(other)
    return installed


def node_profiles(connection_file: str | os.PathLike[str] | None = None) -> list[Profile]:
    """Distinct (profile, isolation) pairs the node offers, smallest memory first.

    A running broker is asked first: it is the truth about what kernels can lease (its sim
    layout, its ``--share`` split, an admin's layout change). With no broker answering, the
    node is discovered locally like ``mig-kernel broker --backend auto`` would (NVML, else the
    default simulated node), so specs can be installed before any broker runs, e.g. when an
    image is built.
    """
    try:
        with BrokerClient(connection_file, timeout=BROKER_TIMEOUT) as client:
            slices = [
                (s["memory_total"], s["profile"], s["isolation"]) for s in client.status()["slices"]
            ]
    except MigKernelError:
        slices = _local_slices()
    pairs: list[Profile] = []
    for _, profile, isolation in sorted(slices, key=lambda s: (s[0], s[1])):
        if (profile, isolation) not in pairs:
            pairs.append((profile, isolation))
    return pairs


def _local_slices() -> list[tuple[int, str, str]]:
    from ..slices import make_inventory  # the kernel side needs the inventory only here

    inventory = make_inventory("auto")
    try:
        return [(s.memory_total, s.profile, s.isolation.value) for s in inventory.slices()]
    finally:
        inventory.close()
