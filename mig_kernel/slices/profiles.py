"""Card models: the MIG GPU-instance profiles of each card this project knows.

Placement search (``placement.py``), the simulated node (``sim.py``) and NVML discovery
(``nvml.py``) all read these tables, so a profile name means the same thing everywhere.

Sources. The H100 80GB table is the one read off a real H100 80GB HBM3 with
``nvidia-smi mig -lgip``/``-lgipp`` and NVML (shared reference gpu-facts.md). The A100 tables
reuse the same shapes (placements, counts, profile ids, NVML enums); their SM counts, copy-engine
counts and memory sizes come from NVIDIA's MIG user guide tables, not from a measurement in this
project. On a real GPU, discovery reads SMs and memory of each MIG device from NVML itself, so
these numbers matter for the simulated node and for error messages only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import UnknownProfile

MiB = 1024 * 1024


@dataclass(frozen=True)
class Profile:
    """One GPU-instance profile of a card, e.g. H100's ``3g.40gb``.

    ``nvml_enum`` is what ``nvmlDeviceGetGpuInstanceProfileInfo`` takes; ``profile_id`` is what
    that call returns as ``.id`` and what create calls take. The two differ (3g: enum 2, id 9).
    ``starts``/``size`` are the allowed placements in memory slots; ``compute_slices`` is the
    ``sliceCount`` NVML reports (7 for the whole-GPU profile, whose size is 8 memory slots).
    """

    name: str
    nvml_enum: int
    profile_id: int
    max_count: int
    sms: int
    copy_engines: int
    memory_mb: int
    starts: tuple[int, ...]
    size: int
    compute_slices: int

    @property
    def memory_bytes(self) -> int:
        """Device memory of one instance, as NVML reports it (memorySizeMB MiB)."""
        return self.memory_mb * MiB


@dataclass(frozen=True)
class CardModel:
    """A MIG-capable card: its slot geometry, profiles and the NVML device names it answers to."""

    name: str
    memory_slots: int
    compute_slices: int
    profiles: tuple[Profile, ...]
    nvml_names: tuple[str, ...]  # substrings of nvmlDeviceGetName results, matched ignoring case

    @property
    def profile_names(self) -> list[str]:
        return [p.name for p in self.profiles]

    @property
    def full_profile(self) -> Profile:
        """The whole-GPU profile (7g): its memory is the memory a MIG-enabled card offers."""
        return max(self.profiles, key=lambda p: (p.compute_slices, p.memory_mb))

    def profile(self, name: str) -> Profile:
        """The profile called ``name`` (case and surrounding space ignored).

        Raises UnknownProfile naming this card's valid profiles, so a typo in a layout tells the
        user what they could have written.
        """
        wanted = name.strip().lower()
        for p in self.profiles:
            if p.name.lower() == wanted:
                return p
        raise UnknownProfile(
            f"unknown profile {name.strip()!r} for {self.name}; "
            f"valid profiles: {', '.join(self.profile_names)}"
        )

    def profile_by_id(self, profile_id: int) -> Profile:
        """The profile NVML reports as ``profileId`` of a GPU instance (discovery needs this)."""
        for p in self.profiles:
            if p.profile_id == profile_id:
                return p
        raise UnknownProfile(f"no profile with NVML profile id {profile_id} on {self.name}")


# The shapes shared by H100 80GB and both A100s (gpu-facts.md): name suffixes differ per card.
# (key, nvml_enum, profile_id, max_count, starts, size, compute_slices)
_SHAPES: tuple[tuple[str, int, int, int, tuple[int, ...], int, int], ...] = (
    ("1g", 0, 19, 7, (0, 1, 2, 3, 4, 5, 6), 1, 1),
    ("1g+me", 7, 20, 1, (0, 1, 2, 3, 4, 5, 6), 1, 1),
    ("1g-rev2", 9, 15, 4, (0, 2, 4, 6), 2, 1),
    ("2g", 1, 14, 3, (0, 2, 4), 2, 2),
    ("3g", 2, 9, 2, (0, 4), 4, 3),
    ("4g", 3, 5, 1, (0,), 4, 4),
    ("7g", 4, 0, 1, (0,), 8, 7),
)


def _card(
    name: str,
    nvml_names: tuple[str, ...],
    per_shape: dict[str, tuple[str, int, int, int]],
) -> CardModel:
    """Build a card from the shared shapes and, per shape, (profile name, SMs, CEs, memory MB)."""
    profiles = []
    for key, enum, pid, max_count, starts, size, compute in _SHAPES:
        pname, sms, ces, mem = per_shape[key]
        profiles.append(
            Profile(
                name=pname,
                nvml_enum=enum,
                profile_id=pid,
                max_count=max_count,
                sms=sms,
                copy_engines=ces,
                memory_mb=mem,
                starts=starts,
                size=size,
                compute_slices=compute,
            )
        )
    return CardModel(
        name=name,
        memory_slots=8,
        compute_slices=7,
        profiles=tuple(profiles),
        nvml_names=nvml_names,
    )


# SM counts are the SXM part's; an H100 PCIe has fewer SMs but the same MIG shapes and memory.
H100_80GB = _card(
    "H100-80GB",
    ("H100 80GB", "H100 PCIe"),
    {
        "1g": ("1g.10gb", 16, 1, 9984),
        "1g+me": ("1g.10gb+me", 16, 1, 9984),
        "1g-rev2": ("1g.20gb", 26, 1, 20096),
        "2g": ("2g.20gb", 32, 2, 20096),
        "3g": ("3g.40gb", 60, 3, 40448),
        "4g": ("4g.40gb", 64, 4, 40448),
        "7g": ("7g.80gb", 132, 8, 81152),
    },
)

A100_40GB = _card(
    "A100-40GB",
    ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB"),
    {
        "1g": ("1g.5gb", 14, 1, 4864),
        "1g+me": ("1g.5gb+me", 14, 1, 4864),
        "1g-rev2": ("1g.10gb", 14, 1, 9856),
        "2g": ("2g.10gb", 28, 2, 9856),
        "3g": ("3g.20gb", 42, 3, 19968),
        "4g": ("4g.20gb", 56, 4, 19968),
        "7g": ("7g.40gb", 98, 7, 40192),
    },
)

A100_80GB = _card(
    "A100-80GB",
    ("A100-SXM4-80GB", "A100-SXM-80GB", "A100-PCIE-80GB", "A100 80GB"),
    {
        "1g": ("1g.10gb", 14, 1, 9728),
        "1g+me": ("1g.10gb+me", 14, 1, 9728),
        "1g-rev2": ("1g.20gb", 14, 1, 19968),
        "2g": ("2g.20gb", 28, 2, 19968),
        "3g": ("3g.40gb", 42, 3, 40192),
        "4g": ("4g.40gb", 56, 4, 40192),
        "7g": ("7g.80gb", 98, 7, 80896),
    },
)

CARDS: dict[str, CardModel] = {c.name: c for c in (H100_80GB, A100_40GB, A100_80GB)}


def card_by_name(name: str) -> CardModel:
    """The card called ``name`` (case ignored); UnknownProfile lists the known cards."""
    wanted = name.strip().lower()
    for card in CARDS.values():
        if card.name.lower() == wanted:
            return card
    raise UnknownProfile(f"unknown card {name.strip()!r}; known cards: {', '.join(CARDS)}")


def card_for_nvml_name(name: str | bytes) -> CardModel | None:
    """The card model of an NVML device name ("NVIDIA H100 80GB HBM3"), or None when unknown.

    None is an answer, not an error: such a GPU still serves whole-GPU slices, and its MIG
    profile names are then read from NVML.
    """
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    text = text.lower()
    for card in CARDS.values():
        if any(sub.lower() in text for sub in card.nvml_names):
            return card
    return None
