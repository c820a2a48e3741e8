"""Layout strings and the placement search that decides whether a layout fits a card.

Whether a set of MIG instances fits is a placement search, not a sum of sizes: on an H100,
``3g.40gb,2g.20gb,1g.10gb,1g.10gb`` fits only with the 3g at slot 4 (gpu-facts.md). The sim
backend builds its slices from the search's answer and the NVML backend creates instances at
exactly those placements, so a layout either fits everywhere or is refused before any GPU change.

Layout grammar (whitespace tolerant, case-insensitive names)::

    layout := gpu (";" gpu)*
    gpu    := CARD ":" item ("," item)*
    item   := [COUNT "x"] PROFILE          e.g. "7x1g.10gb", "2 x 4g.40gb", "3g.40gb"
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .model import LayoutError
from .profiles import CardModel, Profile, card_by_name

MAX_ITEM_COUNT = 64  # no card holds more instances; stops "10**9 x 1g.10gb" building a huge list

_COUNTED = re.compile(r"(?P<count>[^xX]*?)\s*[xX]\s*(?P<name>\S.*)")

EXAMPLE = "H100-80GB:7x1g.10gb"


@dataclass(frozen=True)
class PlacedInstance:
    """One GPU instance of a planned layout: its profile and the memory slots it takes."""

    profile: Profile
    start: int
    size: int

    @property
    def slots(self) -> range:
        return range(self.start, self.start + self.size)


def format_items(names: list[str]) -> str:
    """The compact form of a profile list ("7x1g.10gb", "3g.40gb,2x1g.10gb") for messages."""
    parts: list[str] = []
    i = 0
    while i < len(names):
        j = i
        while j < len(names) and names[j] == names[i]:
            j += 1
        parts.append(names[i] if j - i == 1 else f"{j - i}x{names[i]}")
        i = j
    return ",".join(parts)


def _parse_item(card: CardModel, item: str) -> list[str]:
    text = item.strip()
    if not text:
        raise LayoutError(f"{card.name}: empty item in the profile list")
    count = 1
    name = text
    match = _COUNTED.fullmatch(text)
    if match:
        count_text = match.group("count").strip()
        if not count_text.isdigit() or not 1 <= int(count_text) <= MAX_ITEM_COUNT:
            raise LayoutError(
                f"{card.name}: bad count {count_text!r} in {text!r}; "
                f"write a whole number from 1 to {MAX_ITEM_COUNT}, e.g. '7x1g.10gb'"
            )
        count = int(count_text)
        name = match.group("name")
    return [card.profile(name).name] * count


def parse_items(card: CardModel, text: str) -> list[str]:
    """The profile names (canonical spelling, expanded counts) of one GPU's item list.

    Raises LayoutError for an empty list or a bad count, UnknownProfile for an unknown profile.
    """
    if not text.strip():
        raise LayoutError(
            f"{card.name}: empty profile list; expected items such as "
            f"'7x1g.10gb' or '3g.40gb,2g.20gb' (profiles: {', '.join(card.profile_names)})"
        )
    names: list[str] = []
    for item in text.split(","):
        names.extend(_parse_item(card, item))
    return names


def parse_layout(text: str) -> list[tuple[CardModel, list[str]]]:
    """Parse a node layout: one ``CARD:ITEMS`` entry per GPU, separated by ``;``.

    Only the syntax and names are checked here; ``place`` decides whether each GPU's list fits.
    """
    if not text.strip():
        raise LayoutError(f"empty layout; expected CARD:ITEMS such as {EXAMPLE!r}")
    result: list[tuple[CardModel, list[str]]] = []
    for position, entry in enumerate(text.split(";")):
        if not entry.strip():
            raise LayoutError(
                f"GPU entry {position} of layout {text.strip()!r} is empty; "
                f"entries are separated by ';', e.g. {EXAMPLE!r}"
            )
        card_text, sep, items = entry.partition(":")
        if not sep:
            raise LayoutError(
                f"GPU entry {entry.strip()!r} has no card; write CARD:ITEMS such as {EXAMPLE!r}"
            )
        card = card_by_name(card_text)
        result.append((card, parse_items(card, items)))
    return result


def parse_gpu_layout(text: str, card: CardModel) -> list[str]:
    """One GPU's layout for an admin change: ``CARD:ITEMS`` or just ``ITEMS`` for ``card``.

    A named card must be the GPU's own card: a layout planned for another card's profile table
    would place instances the hardware does not have.
    """
    if ";" in text:
        raise LayoutError(f"a layout change names one GPU; {text.strip()!r} holds several")
    if ":" in text:
        [(named, names)] = parse_layout(text)
        if named is not card:
            raise LayoutError(f"layout is for {named.name} but the GPU is a {card.name}")
        return names
    return parse_items(card, text)


def place(card: CardModel, profile_names: list[str]) -> list[PlacedInstance]:
    """Find non-overlapping placements for the instances; returned in the input order.

    Backtracking search: larger instances first, each trying its profile's placements in
    ascending start order; instances of the same profile take increasing starts, which cuts
    the symmetric orders without losing any layout. Raises LayoutError naming why it does not
    fit (a profile's maximum count, compute slices, or memory slots), UnknownProfile for an
    unknown name.
    """
    profiles = [card.profile(name) for name in profile_names]
    if not profiles:
        return []
    wanted = format_items([p.name for p in profiles])
    prefix = f"{card.name}: {wanted} does not fit"
    for name, count in Counter(p.name for p in profiles).items():
        limit = card.profile(name).max_count
        if count > limit:
            plural = "instance" if limit == 1 else "instances"
            raise LayoutError(
                f"{prefix}: {name} requested {count} times exceeds the profile's maximum of "
                f"{limit} {plural}"
            )
    compute = sum(p.compute_slices for p in profiles)
    if compute > card.compute_slices:
        raise LayoutError(
            f"{prefix}: needs {compute} compute slices, the card has {card.compute_slices}"
        )

    order = sorted(
        range(len(profiles)),
        key=lambda i: (-profiles[i].size, -profiles[i].compute_slices, profiles[i].name, i),
    )
    used = [False] * card.memory_slots
    starts: list[int] = [-1] * len(profiles)

    def search(k: int, min_start: int) -> bool:
        if k == len(order):
            return True
        profile = profiles[order[k]]
        same_next = k + 1 < len(order) and profiles[order[k + 1]] is profile
        for start in profile.starts:
            end = start + profile.size
            if start < min_start or end > card.memory_slots or any(used[start:end]):
                continue
            used[start:end] = [True] * profile.size
            starts[order[k]] = start
            if search(k + 1, start + 1 if same_next else 0):
                return True
            used[start:end] = [False] * profile.size
        return False

    if not search(0, 0):
        slots = sum(p.size for p in profiles)
        if slots > card.memory_slots:
            detail = f"needs {slots} of the card's {card.memory_slots} memory slots"
        else:
            detail = (
                f"needs {slots} of {card.memory_slots} memory slots, but the profiles' "
                "allowed start slots leave no arrangement"
            )
        raise LayoutError(f"{prefix}: no placement: memory slots exhausted ({detail})")
    return [PlacedInstance(p, s, p.size) for p, s in zip(profiles, starts, strict=True)]


def fits(card: CardModel, profile_names: list[str]) -> bool:
    """Whether the instances fit the card; an unknown profile name still raises UnknownProfile."""
    try:
        place(card, profile_names)
    except LayoutError:
        return False
    return True
