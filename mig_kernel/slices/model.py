"""What a slice is, independent of where it comes from (NVML, or the simulated node).

The broker only ever sees these types; each inventory backend (``nvml``, ``sim``) produces them.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class Isolation(str, enum.Enum):
    """How strongly a slice is separated from its neighbours (design.md, "Slices")."""

    MIG = "mig"  # a MIG device: own SMs, L2, memory and fault domain
    PROCESS = "process"  # a whole GPU or a share of one: own context, capped memory, shared SMs
    SIM = "sim"  # simulated on the CPU with NumPy


class SliceError(Exception):
    """Base class of inventory errors; ``code`` is the machine-readable reason."""

    code = "slice_error"


class UnknownProfile(SliceError):
    code = "unknown_profile"


class LayoutError(SliceError):
    """A layout string that does not parse or does not fit on its card."""

    code = "layout_does_not_fit"


class ApplyRefused(SliceError):
    """An admin layout change refused before or while touching the GPU.

    ``code`` is one of ``no_permission``, ``in_use``, ``insufficient_resources``,
    ``mig_disabled``, ``layout_does_not_fit``, ``no_such_gpu``, ``not_supported``, or
    ``nvml_error`` for an NVML failure none of those names.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class GpuInfo:
    """One physical (or simulated) GPU of the node, as the partition map draws it."""

    index: int
    uuid: str
    name: str
    card: str | None  # card model name ("H100-80GB") when known
    memory_total: int  # bytes
    mig_enabled: bool
    memory_slots: int  # MIG memory slots (8 on H100/A100); 0 when the card has no MIG model
    simulated: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SliceInfo:
    """One leasable slice: a MIG device, a whole GPU, a share of a GPU, or a simulated slice."""

    id: str  # stable human label, "gpu0-s3"
    uuid: str  # "MIG-..." for MIG devices, "GPU-..." for whole GPUs, "SIM-..." in sim
    gpu_index: int
    gpu_uuid: str
    profile: str  # "1g.10gb", or "gpu.80gb" / "gpu-1of4.20gb" for process slices
    isolation: Isolation
    memory_total: int  # bytes
    sms: int | None = None
    placement_start: int | None = None  # MIG memory slot the instance starts at
    placement_size: int | None = None
    runtime: str = "numpy"  # "cupy" on a GPU slice, "numpy" on a sim slice
    memory_limit: int | None = None  # cap the executor enforces itself (process and sim slices)
    env: dict[str, str] = field(default_factory=dict)  # environment of the slice's executor

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["isolation"] = self.isolation.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SliceInfo:
        data = dict(data)
        data["isolation"] = Isolation(data["isolation"])
        data["env"] = dict(data.get("env") or {})
        return cls(**data)


class Inventory(abc.ABC):
    """A source of slices. Called by the broker: ``slices`` at start and after a layout change,
    ``memory_used`` when it builds a status reply, ``apply_layout`` for the admin operation."""

    backend: str = ""

    @abc.abstractmethod
    def gpus(self) -> list[GpuInfo]:
        """The node's GPUs."""

    @abc.abstractmethod
    def slices(self) -> list[SliceInfo]:
        """Every slice the node offers now, in a stable order."""

    def memory_used(self, info: SliceInfo) -> int | None:
        """Device memory in use on the slice, or None when only its executor can tell."""
        return None

    @abc.abstractmethod
    def apply_layout(self, gpu_index: int, layout: str) -> list[SliceInfo]:
        """Replace the MIG instances of an idle GPU with ``layout``; returns the node's slices.

        Raises ApplyRefused naming the reason; whether the layout fits is decided before
        anything on the GPU is touched.
        """

    def close(self) -> None:  # noqa: B027 - optional hook: the sim has nothing to release
        """Release the backend (NVML shutdown)."""
