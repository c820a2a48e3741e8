"""The broker's lease policy: who may lease what, how many, who may act on whose lease, which
slice fits a request best, and which queued requests a set of free slices goes to.

No sockets, no SQLite, no clock: plain functions of the broker's records, so the multi-user rules
are tested as functions (tests/test_policy.py). The broker's loop asks, and carries out what the
answer says.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from traitlets import Dict, Enum, Int, List, Set, Unicode, Union
from traitlets.config import LoggingConfigurable

from ..slices.model import SliceInfo
from ..wire import errors as E
from .identity import Identity
from .state import Request, SliceRecord, Ticket

ANYONE = "*"  # the allowed_profiles key that applies to every user
ALL = "all"  # a limit of "all": as many slices as the node has
KERNEL_TAG = "kernel:"  # the provisioner labels a kernel's lease kernel:<kernel id>


def limit_trait(default: int | str = 1, **kwargs: object) -> Union:
    """A number of slices, or "all" (no limit of its own: what the node has)."""
    return Union([Int(min=0), Enum([ALL])], default_value=default, **kwargs)


@dataclass(frozen=True)
class Holding:
    """One slice a user holds, as a refusal or a queued request of theirs names it: the user
    must learn which of their notebooks to go to, not a lease id."""

    lease_id: str
    slice_id: str
    profile: str
    idle_seconds: float
    label: str | None = None  # the holder's notebook, as its kernel told the broker
    tag: str | None = None

    def text(self) -> str:
        where = f"{self.profile} on {self.slice_id}, idle {_clock(self.idle_seconds)}"
        if self.label:
            return f"{self.label} ({where}, lease {self.lease_id})"
        if self.tag and self.tag.startswith(KERNEL_TAG):
            kernel = self.tag[len(KERNEL_TAG) :]
            return f"the notebook of kernel {kernel[:8]} ({where}, lease {self.lease_id})"
        return f"lease {self.lease_id} ({where}; not a notebook)"


class LeasePolicy(LoggingConfigurable):
    """Per-user and per-group rules, configured as ``c.LeasePolicy.<name>``."""

    per_user_limit = limit_trait(
        1,
        help="Slices one user may hold at once (a number, or 'all': as many as the node has), "
        "unless user_limits or group_limits say otherwise. A request beyond it waits in the "
        "queue, told which of the user's notebooks hold their slices, until one is released; "
        "one that asked not to wait is refused with the same names. `mig-kernel lab` starts "
        "its broker with 'all' (one person at the machine).",
    ).tag(config=True)
    user_limits = Dict(
        key_trait=Unicode(),
        value_trait=limit_trait(),
        help="Slices per user for named users, e.g. {'alice': 2}; wins over group_limits.",
    ).tag(config=True)
    group_limits = Dict(
        key_trait=Unicode(),
        value_trait=limit_trait(),
        help="Slices per user for members of a group, e.g. {'gpu-power': 4}; a user in several "
        "listed groups gets the largest. Groups are the OS groups of the user.",
    ).tag(config=True)
    allowed_users = Set(
        Unicode(),
        help="Users who may use the broker at all (with allowed_groups; both empty: every "
        "local user). Others are refused at sign-in, with that reason.",
    ).tag(config=True)
    allowed_groups = Set(
        Unicode(), help="Groups whose members may use the broker (see allowed_users)."
    ).tag(config=True)
    allowed_profiles = Dict(
        key_trait=Unicode(),
        value_trait=List(Unicode()),
        help="Profiles each group may lease, e.g. {'students': ['1g.10gb'], '*': ['1g.10gb', "
        "'2g.20gb']}; '*' applies to every user. A user may lease the profiles of all their "
        "listed groups. Empty (the default): every profile for everyone.",
    ).tag(config=True)
    admin_users = Set(
        Unicode(),
        help="Users who may drain slices, apply layouts, release anyone's lease and see holder "
        "names. Default: the broker's own user on a single-user broker; on a multi-user broker "
        "nobody but root.",
    ).tag(config=True)
    admin_groups = Set(Unicode(), help="Groups whose members are broker admins.").tag(config=True)

    # -- who ----------------------------------------------------------------------------
    def is_admin(self, who: Identity) -> bool:
        """Named users and groups; root; and whoever the identity provider vouches for (a
        JupyterHub admin)."""
        return (
            who.admin
            or (who.uid == 0 and who.user == "root")
            or who.user in self.admin_users
            or bool(self.admin_groups.intersection(who.groups))
        )

    def check_allowed(self, who: Identity) -> None:
        """Refuse a user the operator did not let in (at sign-in)."""
        if not self.allowed_users and not self.allowed_groups:
            return
        if who.user in self.allowed_users or self.allowed_groups.intersection(who.groups):
            return
        if self.is_admin(who):
            return
        raise E.NotPermitted(
            f"user {who.user!r} is not allowed to use this GPU node by its policy (allowed: "
            f"{_listing(self.allowed_users, self.allowed_groups)}); ask its administrator"
        )

    def may_manage(self, who: Identity, owner: str) -> bool:
        """Whether ``who`` may release or inspect a lease of ``owner``."""
        return who.user == owner or who.admin

    # -- how many -----------------------------------------------------------------------
    def limit_for(self, who: Identity) -> int | None:
        """Slices ``who`` may hold at once; None: no limit of its own (the node's size)."""
        if who.user in self.user_limits:
            return _number(self.user_limits[who.user])
        by_group = [_number(self.group_limits[g]) for g in who.groups if g in self.group_limits]
        if by_group:
            return None if None in by_group else max(n for n in by_group if n is not None)
        return _number(self.per_user_limit)

    def at_limit(self, who: Identity, held: int) -> bool:
        limit = self.limit_for(who)
        return limit is not None and held >= limit

    def check_quota(self, who: Identity, held: Sequence[Holding]) -> None:
        """Refuse a request that may not wait (``wait=False``) beyond the user's limit."""
        if self.at_limit(who, len(held)):
            raise E.QuotaExceeded(
                f"user {who.user!r} already holds {len(held)} of {self.limit_for(who)} "
                f"allowed slice(s): {holdings_text(held)}; {FREE_ONE}",
                held=[h.lease_id for h in held],
            )

    def quota_wait(self, who: Identity, held: Sequence[Holding]) -> str | None:
        """Why a queued request of ``who`` waits for one of their own slices (one line), or
        None when their limit is not what holds it back."""
        if not self.at_limit(who, len(held)):
            return None
        return (
            f"you hold {len(held)} of the {self.limit_for(who)} GPU slice(s) one user may "
            f"hold here: {holdings_text(held)}. This waits until one is released; {FREE_ONE}"
        )

    # -- what ---------------------------------------------------------------------------
    def profiles_for(self, who: Identity) -> set[str] | None:
        """The profiles ``who`` may lease (None: any)."""
        if not self.allowed_profiles or who.admin:
            return None
        keys = [ANYONE, *who.groups]
        return {p for key in keys for p in self.allowed_profiles.get(key, ())}

    def may_use(self, who: Identity, info: SliceInfo) -> bool:
        allowed = self.profiles_for(who)
        return allowed is None or info.profile in allowed

    def check_request(self, who: Identity, request: Request, offered: Sequence[SliceInfo]) -> None:
        """Refuse a request that no slice of the node could ever satisfy, or none that the
        user is allowed to lease, naming what the node (or the policy) offers."""
        check_satisfiable(request, offered)
        allowed = self.profiles_for(who)
        if allowed is None:
            return
        if not any(request.fits(i) and i.profile in allowed for i in offered):
            raise E.NotPermitted(
                f"user {who.user!r} may not lease {describe(request)} on this node by its "
                f"policy; allowed profiles: {', '.join(sorted(allowed)) or 'none'}"
            )


FREE_ONE = (
    "to free one, run `%gpu release` in that notebook (its data is kept) or press Release in "
    "JupyterLab's GPU slices panel"
)


def holdings_text(held: Sequence[Holding]) -> str:
    return "; ".join(h.text() for h in held) or "none"


def _number(limit: int | str) -> int | None:
    return None if limit == ALL else int(limit)


def _clock(seconds: float) -> str:
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    if hours:
        return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{rest // 60}:{rest % 60:02d}"


def _listing(users: Iterable[str], groups: Iterable[str]) -> str:
    parts = [*sorted(users), *(f"group {g}" for g in sorted(groups))]
    return ", ".join(parts) or "nobody"


def describe(request: Request) -> str:
    parts = []
    if request.profile:
        parts.append(f"profile {request.profile}")
    if request.memory:
        parts.append(f"{request.memory / 2**30:.2f} GiB of memory")
    return " and ".join(parts) or "any request"


def check_satisfiable(request: Request, offered: Sequence[SliceInfo]) -> None:
    profiles = sorted({i.profile for i in offered})
    if request.profile is not None and request.profile not in profiles:
        offered_text = ", ".join(profiles) or "nothing"
        raise E.UnknownProfileError(
            f"unknown profile {request.profile!r}: this node offers {offered_text}"
        )
    if not any(request.fits(i) for i in offered):
        largest = max((i.memory_total for i in offered), default=0)
        raise E.NoSuchSlice(
            f"no slice on this node has {describe(request)} (largest: {largest / 2**30:.1f} GiB)"
        )


def best_fit(request: Request, candidates: Iterable[SliceRecord]) -> SliceRecord | None:
    """The smallest candidate (memory, then SMs, then id) that satisfies the request."""
    return min(
        (r for r in candidates if request.fits(r.info)),
        key=lambda r: (r.info.memory_total, r.info.sms or 0, r.info.id),
        default=None,
    )


def queue_grants(
    queue: Sequence[Ticket],
    free: Sequence[SliceRecord],
    held: Counter[str],
    limit: Callable[[Ticket], int | None],
    may_use: Callable[[Ticket, SliceInfo], bool],
) -> list[tuple[Ticket, SliceRecord]]:
    """Which queued requests the free slices go to: oldest first, each to its best fit among
    the slices its user may lease; a request whose user is at their limit, or that nothing free
    fits, waits without blocking later ones."""
    free = list(free)
    held = Counter(held)
    grants = []
    for ticket in queue:
        if not free:
            break
        most = limit(ticket)
        if most is not None and held[ticket.user] >= most:
            continue
        record = best_fit(ticket.request, (r for r in free if may_use(ticket, r.info)))
        if record is None:
            continue
        free.remove(record)
        held[ticket.user] += 1
        grants.append((ticket, record))
    return grants
