"""The simulated node: declared cards cut into MIG-shaped slices that run on the CPU.

It lets the broker, the kernel side and the demos run on laptops and in CI with the same slice
shapes a real card would have: the layout goes through the same placement search as a real
admin change, so a layout the sim accepts is one the hardware accepts too.
"""

from __future__ import annotations

import uuid

from .model import (
    ApplyRefused,
    GpuInfo,
    Inventory,
    Isolation,
    LayoutError,
    SliceInfo,
    UnknownProfile,
)
from .placement import PlacedInstance, parse_gpu_layout, parse_layout, place
from .profiles import CardModel

# Fixed namespace: simulated UUIDs must not change across broker restarts (leases, spilled
# arrays and the state database refer to slices by UUID).
SIM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/mig-kernel/sim")


def _gpu_uuid(index: int, card: CardModel) -> str:
    return f"SIM-GPU-{uuid.uuid5(SIM_NAMESPACE, f'gpu/{index}/{card.name}')}"


def _slice_uuid(index: int, card: CardModel, inst: PlacedInstance) -> str:
    key = f"slice/{index}/{card.name}/{inst.profile.name}/{inst.start}"
    return f"SIM-{uuid.uuid5(SIM_NAMESPACE, key)}"


class SimInventory(Inventory):
    """Slices of simulated GPUs, declared by a layout such as ``"H100-80GB:7x1g.10gb"``.

    An impossible layout raises LayoutError (or UnknownProfile) from the constructor, so the
    broker refuses to start and names why.
    """

    backend = "sim"

    def __init__(self, layout: str) -> None:
        self._cards: list[CardModel] = []
        self._placed: list[list[PlacedInstance]] = []
        for card, names in parse_layout(layout):
            self._cards.append(card)
            self._placed.append(place(card, names))

    def gpus(self) -> list[GpuInfo]:
        return [
            GpuInfo(
                index=index,
                uuid=_gpu_uuid(index, card),
                name=f"Simulated {card.name}",
                card=card.name,
                memory_total=card.full_profile.memory_bytes,
                mig_enabled=True,
                memory_slots=card.memory_slots,
                simulated=True,
            )
            for index, card in enumerate(self._cards)
        ]

    def slices(self) -> list[SliceInfo]:
        result: list[SliceInfo] = []
        for index, (card, placed) in enumerate(zip(self._cards, self._placed, strict=True)):
            gpu_uuid = _gpu_uuid(index, card)
            for k, inst in enumerate(sorted(placed, key=lambda p: p.start)):
                memory = inst.profile.memory_bytes
                result.append(
                    SliceInfo(
                        id=f"gpu{index}-s{k}",
                        uuid=_slice_uuid(index, card, inst),
                        gpu_index=index,
                        gpu_uuid=gpu_uuid,
                        profile=inst.profile.name,
                        isolation=Isolation.SIM,
                        memory_total=memory,
                        sms=inst.profile.sms,
                        placement_start=inst.start,
                        placement_size=inst.size,
                        runtime="numpy",
                        memory_limit=memory,
                        env={"CUDA_VISIBLE_DEVICES": ""},  # a sim executor must not see a GPU
                    )
                )
        return result

    def apply_layout(self, gpu_index: int, layout: str) -> list[SliceInfo]:
        """Replace one simulated GPU's instances; accepts ``CARD:ITEMS`` or ``ITEMS``."""
        if not 0 <= gpu_index < len(self._cards):
            raise ApplyRefused(
                "no_such_gpu",
                f"no GPU {gpu_index}: the simulated node has {len(self._cards)} GPU(s)",
            )
        card = self._cards[gpu_index]
        try:
            placed = place(card, parse_gpu_layout(layout, card))
        except (LayoutError, UnknownProfile) as exc:
            raise ApplyRefused("layout_does_not_fit", str(exc)) from exc
        self._placed[gpu_index] = placed
        return self.slices()
