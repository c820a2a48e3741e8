"""The node's slices, wherever they come from: real GPUs through NVML, or a simulated node.

The broker calls ``make_inventory`` once at start; ``auto`` (the embedded default) uses NVML
when it finds a GPU and the simulated node otherwise, so the same broker runs on an H100 node,
a laptop and CI.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from .model import (
    ApplyRefused,
    GpuInfo,
    Inventory,
    Isolation,
    LayoutError,
    SliceError,
    SliceInfo,
    UnknownProfile,
)
from .sim import SimInventory

__all__ = [
    "BACKENDS",
    "DEFAULT_SIM_LAYOUT",
    "ApplyRefused",
    "GpuInfo",
    "Inventory",
    "Isolation",
    "LayoutError",
    "SimInventory",
    "SliceError",
    "SliceInfo",
    "UnknownProfile",
    "make_inventory",
]

log = logging.getLogger(__name__)

DEFAULT_SIM_LAYOUT = "H100-80GB:7x1g.10gb"
BACKENDS = ("auto", "nvml", "sim")


def _open_nvml(share: int, nvml: Any) -> Any:
    """An NvmlInventory, or the reason NVML cannot serve (str) when the library, driver or
    GPU is missing. Other errors (a bad ``share``) propagate."""
    from .nvml import NvmlInventory  # imported late: the sim path never needs it

    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError as exc:
            return f"pynvml is not installed ({exc})"
    try:
        inventory = NvmlInventory(share=share, nvml=nvml)
    except nvml.NVMLError as exc:
        return str(exc)
    try:
        count = len(inventory.gpus())
    except SliceError as exc:
        inventory.close()
        return str(exc)
    if count == 0:
        inventory.close()
        return "NVML found no GPU"
    return inventory


def make_inventory(
    backend: str = "auto",
    sim_layout: str = DEFAULT_SIM_LAYOUT,
    share: int = 1,
    nvml: Any = None,
) -> Inventory:
    """The inventory the broker runs on.

    ``backend``: ``auto`` (NVML if it finds a GPU, else the simulated node), ``nvml`` (raise
    SliceError "NVML not available: <reason>" when it cannot serve) or ``sim``. ``sim_layout``
    declares the simulated node; an impossible one raises LayoutError or UnknownProfile.
    ``share`` splits each GPU without MIG into that many process slices. ``nvml`` replaces the
    ``pynvml`` module (tests pass a fake).
    """
    if backend not in BACKENDS:
        raise SliceError(f"unknown inventory backend {backend!r}; choose one of {BACKENDS}")
    if backend == "sim":
        return SimInventory(sim_layout)
    opened = _open_nvml(share, nvml)
    if not isinstance(opened, str):
        return opened
    if backend == "nvml":
        raise SliceError(f"NVML not available: {opened}")
    log.info("NVML not available (%s): using the simulated node %r", opened, sim_layout)
    return SimInventory(sim_layout)
