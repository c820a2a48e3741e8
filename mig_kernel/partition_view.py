"""The node's partition map as self-contained HTML: one row of memory slots per GPU, each slice
drawn on the slots it occupies, coloured and labelled by state.

It reads design.md's status JSON (a ``status`` answer or a watch-stream state) and nothing else,
so the notebook widget (``mig_kernel.widgets``) and any other display can share it; it imports
no widget library. Everything is inline (styles on the elements, CSS classes prefixed ``mig-``
for themes and tests), because an ipywidgets ``HTML`` value or a sanitized panel may drop
``<style>`` blocks. Every piece of text from the state is escaped: holders and reasons come from
other users.

Themes: fills are mid-tones (readable against a light and a dark page), and the text on each
fill is black or white, whichever contrasts more (WCAG ratio, at least 4.5 for every state).
Colour is never the only cue: each slice carries its state as text.

The viewer's slices: the one held by this notebook's kernel (``this_slice``) says "this
notebook" with a thick border; the user's others say "yours" with a thinner one. A slice
running a call says "computing". Memory reads ``0.38/9.75 GiB`` here, in ``%gpu status``, the
status bar and the side panel alike. Each slice is four short lines at most, so eight slots in
a row and four GPUs (28 slices) stay readable.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any

from .slices.model import UnknownProfile
from .slices.profiles import card_by_name

GiB = 2**30

# Mid-tone fills; the text colour is derived (``text_colour``) so a new fill cannot be unreadable.
STATE_FILLS: dict[str, str] = {
    "free": "#4caf50",
    "warming": "#d9a21b",
    "leased": "#5b8def",
    "draining": "#a77bd6",
    "broken": "#e4675c",
}
UNKNOWN_FILL = "#9aa0a6"  # a state this version does not know: still labelled with its name
DARK_TEXT, LIGHT_TEXT = "#111111", "#ffffff"
# Theme-aware where JupyterLab's variables exist, a dark fallback elsewhere (on a mid-tone fill).
THIS_BORDER = "3px solid var(--jp-ui-font-color0, #1a1a1a)"
MINE_BORDER = "2px dashed var(--jp-ui-font-color0, #1a1a1a)"
OTHER_BORDER = "1px solid rgba(127, 127, 127, 0.7)"
COMPUTING = 0.01  # a busy share from which a slice shows as computing


def _luminance(colour: str) -> float:
    """WCAG relative luminance of ``#rrggbb``."""
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two ``#rrggbb`` colours (1 to 21)."""
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def text_colour(fill: str) -> str:
    """Black or white text, whichever reads better on ``fill``."""
    return max((DARK_TEXT, LIGHT_TEXT), key=lambda text: contrast(fill, text))


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _gib(nbytes: Any) -> str:
    """Two decimals, halves rounded up, as JavaScript's ``toFixed`` in the side panel does
    (Python's format rounds 19.625 to 19.62, the panel to 19.63)."""
    hundredths = math.floor((_number(nbytes) or 0.0) / GiB * 100 + 0.5)
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def memory_text(used: Any, total: Any) -> str:
    """``0.38/9.75 GiB``: the one memory format of every display."""
    return f"{_gib(used)}/{_gib(total)} GiB"


def _clock(seconds: float) -> str:
    """``9:32``; rounded up, as the side panel, so 0:00 means gone."""
    whole = max(0, math.ceil(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


def idle_left(entry: dict[str, Any], elapsed: float = 0.0) -> float | None:
    """Seconds until the viewer's lease on this slice is reclaimed for idleness, ``elapsed``
    seconds after the state was taken; None when unknown or when it is never reclaimed.

    ``lease.expires_in`` (a status answer) wins; otherwise ``idle_timeout - idle_seconds``
    (a watch state whose ``lease`` the display filled in with the timeout it knows)."""
    lease = entry.get("lease") or {}
    expires = _number(lease.get("expires_in"))
    if expires is not None:
        return max(0.0, expires - elapsed)
    limit, idle = _number(lease.get("idle_timeout")), _number(entry.get("idle_seconds"))
    if limit is None or limit <= 0 or idle is None:
        return None
    return max(0.0, limit - idle - elapsed)


def counts_down(entry: dict[str, Any]) -> bool:
    """Whether the slice shows a ticking idle countdown (the viewer's, with a known timeout)."""
    return bool(entry.get("mine")) and idle_left(entry) is not None


def _idle_text(entry: dict[str, Any], elapsed: float) -> str | None:
    if not entry.get("mine") or entry.get("state") not in ("leased", "draining"):
        return None
    left = idle_left(entry, elapsed)
    if left is not None:  # the status bar's and the panel's wording: time left before release
        return f"idle {_clock(left)}"
    limit = _number((entry.get("lease") or {}).get("idle_timeout"))
    if limit is not None and limit <= 0:
        return "no idle release"
    idle = _number(entry.get("idle_seconds"))
    return f"idle for {_clock(idle + elapsed)}" if idle is not None else None


def _slice_html(entry: dict[str, Any], column: str, elapsed: float, this: bool) -> str:
    state = str(entry.get("state") or "unknown")
    fill = STATE_FILLS.get(state, UNKNOWN_FILL)
    mine = bool(entry.get("mine"))
    placement = entry.get("placement") or {}
    busy = _number(entry.get("busy"))
    held = state in ("leased", "draining")
    lines = [
        f'<div class="mig-slice-head"><b class="mig-profile">{_e(entry.get("profile"))}</b> '
        f'<span class="mig-state" style="font-weight:600;text-transform:uppercase">{_e(state)}'
        f'</span> <span class="mig-isolation">{_e(entry.get("isolation"))}</span></div>',
    ]
    if this:
        lines.append(
            '<div class="mig-holder mig-this-notebook" style="font-weight:700">this notebook</div>'
        )
    elif mine:
        lines.append('<div class="mig-holder mig-yours" style="font-weight:700">yours</div>')
    elif entry.get("holder"):
        lines.append(f'<div class="mig-holder">{_e(entry["holder"])}</div>')
    lines.append(
        f'<div class="mig-memory">'
        f"{memory_text(entry.get('memory_used'), entry.get('memory_total'))}</div>"
    )
    computing = held and busy is not None and busy >= COMPUTING
    idle = _idle_text(entry, elapsed)
    if computing:  # instead of the idle clock: it is not idle
        lines.append(f'<div class="mig-busy">computing {busy * 100:.0f}%</div>')
    elif idle:
        lines.append(f'<div class="mig-idle">{_e(idle)}</div>')
    if entry.get("broken_reason"):
        lines.append(f'<div class="mig-broken-reason">{_e(entry["broken_reason"])}</div>')
    title = " | ".join(
        str(part)
        for part in (entry.get("id"), entry.get("uuid"), entry.get("profile"), state)
        if part
    )
    if entry.get("sms"):
        title += f" | {entry['sms']} SMs"
    classes = (
        f"mig-slice mig-state-{_e(state)}"
        + (" mig-mine" if mine else "")
        + (" mig-this" if this else "")
        + (" mig-computing" if computing else "")
    )
    border = THIS_BORDER if this else (MINE_BORDER if mine else OTHER_BORDER)
    style = (
        f"grid-column:{column};background:{fill};color:{text_colour(fill)};"
        f"border:{border};border-radius:4px;padding:3px 5px;"
        "min-width:0;overflow-wrap:anywhere;line-height:1.25"
    )
    slot_attrs = ""
    if _has_placement(entry):
        start, size = _e(placement["start"]), _e(placement["size"])
        slot_attrs = f' data-slot-start="{start}" data-slot-size="{size}"'
    return (
        f'<div class="{classes}" data-slice="{_e(entry.get("id"))}" data-state="{_e(state)}"'
        f'{slot_attrs} title="{_e(title)}" style="{style}">{"".join(lines)}</div>'
    )


def memory_slots(gpu: dict[str, Any], placed: list[dict[str, Any]]) -> int:
    """The GPU's MIG memory slots: what the broker reported (from the card's profile table),
    else the card's table by name, else as many as the placements reach (unknown card)."""
    slots = int(_number(gpu.get("memory_slots")) or 0)
    if slots <= 0 and gpu.get("card"):
        try:
            slots = card_by_name(str(gpu["card"])).memory_slots
        except UnknownProfile:
            slots = 0
    reach = max(
        (int(s["placement"]["start"]) + int(s["placement"]["size"]) for s in placed), default=0
    )
    return max(slots, reach)


def _grid(columns: int, cells: list[str]) -> str:
    return (
        f'<div class="mig-slots" style="display:grid;'
        f'grid-template-columns:repeat({columns},minmax(0,1fr));gap:3px">{"".join(cells)}</div>'
    )


def _gpu_html(
    gpu: dict[str, Any], entries: list[dict[str, Any]], elapsed: float, this_slice: str | None
) -> str:
    placed = [s for s in entries if _has_placement(s)]
    shared = [s for s in entries if not _has_placement(s)]
    slots = memory_slots(gpu, placed) if placed else 0
    kind = (
        "simulated"
        if gpu.get("simulated")
        else ("MIG" if gpu.get("mig_enabled") else "MIG off: process shares")
    )
    title = f"GPU {gpu.get('index')} · {gpu.get('card') or gpu.get('name') or 'unknown card'}"
    detail = f"{kind}, {slots} memory slots" if slots else kind
    parts = [
        f'<div class="mig-gpu" data-gpu="{_e(gpu.get("index"))}" style="margin:0 0 8px 0">',
        f'<div class="mig-gpu-title" style="font-weight:600;margin-bottom:3px">{_e(title)} '
        f'<span class="mig-gpu-kind" style="font-weight:400;opacity:0.8">({_e(detail)})</span>'
        "</div>",
    ]
    if slots:
        used = set()
        cells = []
        for s in sorted(placed, key=lambda s: int(s["placement"]["start"])):
            start, size = int(s["placement"]["start"]), int(s["placement"]["size"])
            used.update(range(start, start + size))
            this = this_slice is not None and s.get("id") == this_slice
            cells.append(_slice_html(s, f"{start + 1} / span {size}", elapsed, this))
        for slot in sorted(set(range(slots)) - used):
            cells.append(  # the side panel's word too: memory no instance was made on
                f'<div class="mig-slot-unused" data-slot-start="{slot}" data-slot-size="1" '
                f'style="grid-column:{slot + 1} / span 1;border:1px dashed rgba(127,127,127,0.7);'
                'border-radius:4px;padding:3px 5px;opacity:0.8">unallocated</div>'
            )
        ruler = [
            f'<div class="mig-slot-number" style="grid-column:{slot + 1} / span 1;'
            f'text-align:center;font-size:10px;opacity:0.7">{slot}</div>'
            for slot in range(slots)
        ]
        parts += [_grid(slots, cells), _grid(slots, ruler)]
    if shared:  # whole GPUs and process shares: equal parts of the card
        parts.append(
            _grid(
                len(shared),
                [
                    _slice_html(s, f"{i + 1} / span 1", elapsed, s.get("id") == this_slice)
                    for i, s in enumerate(shared)
                ],
            )
        )
    if not entries:
        parts.append('<div class="mig-empty">no slices</div>')
    parts.append("</div>")
    return "".join(parts)


def _has_placement(entry: dict[str, Any]) -> bool:
    placement = entry.get("placement")
    return (
        isinstance(placement, dict)
        and _number(placement.get("start")) is not None
        and _number(placement.get("size")) is not None
    )


def _gpus(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The state's GPUs, plus a bare entry for any GPU a slice names that the list lacks."""
    gpus = [g for g in state.get("gpus") or [] if isinstance(g, dict)]
    known = {g.get("index") for g in gpus}
    for entry in state.get("slices") or []:
        if entry.get("gpu") not in known:
            known.add(entry.get("gpu"))
            gpus.append({"index": entry.get("gpu")})
    return gpus


def queue_text(state: dict[str, Any]) -> str:
    queue = state.get("queue") or []
    if not queue:
        return "queue: empty"
    mine = sum(1 for q in queue if q.get("mine"))
    return f"queue: {len(queue)} waiting" + (f" ({mine} yours)" if mine else "")


def _elapsed(state: dict[str, Any], now: float | None) -> float:
    received = _number(state.get("received_at"))
    if received is None:
        return 0.0
    return max(0.0, (time.time() if now is None else now) - received)


def render_html(
    state: dict[str, Any], *, now: float | None = None, this_slice: str | None = None
) -> str:
    """The partition map of ``state`` (design.md's status JSON).

    If the state carries ``received_at`` (epoch seconds when the viewer got it, set by the
    widget), idle countdowns are advanced to ``now`` (default: the current time), so a display
    can tick between publications; without it they are shown as of the state. ``this_slice``
    is the id of the slice the viewing notebook's kernel holds, drawn apart from the user's
    other slices.
    """
    elapsed = _elapsed(state, now)
    slices = [s for s in state.get("slices") or [] if isinstance(s, dict)]
    body = [
        _gpu_html(gpu, [s for s in slices if s.get("gpu") == gpu.get("index")], elapsed, this_slice)
        for gpu in _gpus(state)
    ]
    if not body:
        body.append('<div class="mig-empty">this node offers no slices</div>')
    return (
        '<div class="mig-partitions" style="font-size:12px;overflow-x:auto">'
        '<div style="min-width:480px">'
        + "".join(body)
        + f'<div class="mig-queue">{_e(queue_text(state))}</div></div></div>'
    )


def render_header(state: dict[str, Any], *, updated: float | None = None) -> str:
    """One line above the map: node, backend, when the state arrived, queue length."""
    when = time.strftime("%H:%M:%S", time.localtime(updated)) if updated is not None else "-"
    return (
        '<div class="mig-monitor-header" style="font-size:12px">'
        f'<b class="mig-node">{_e(state.get("node") or "node")}</b>'
        f' · backend <span class="mig-backend">{_e(state.get("backend") or "-")}</span>'
        f' · updated <span class="mig-updated">{_e(when)}</span>'
        f' · <span class="mig-queue-length">{_e(queue_text(state))}</span></div>'
    )
