"""The broker's lease policy: who may lease what, how many, who may act on whose lease, which
slice fits a request best, and which queued requests a set of free slices goes to.

No sockets, no SQLite, no clock: plain functions of the broker's records, so the multi-user rules
are tested as functions (tests/test_policy.py). The broker's loop asks, and carries out what the
answer says.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from traitlets import Dict, Int, List, Set, Unicode
from traitlets.config import LoggingConfigurable

from ..slices.model import SliceInfo
from ..wire import errors as E
from .identity import Identity
from .state import Lease, Request, SliceRecord, Ticket

ANYONE = "*"  # the allowed_profiles key that applies to every user


class LeasePolicy(LoggingConfigurable):
    """Per-user and per-group rules, configured as ``c.LeasePolicy.<name>``."""

    per_user_limit = Int(
        1,
        help="Slices one user may hold at once, unless user_limits or group_limits say "
        "otherwise. A request beyond it is refused with the leases the user holds.",
    ).tag(config=True)
    user_limits = Dict(
        key_trait=Unicode(),
        value_trait=Int(),
        help="Slices per user for named users, e.g. {'alice': 2}; wins over group_limits.",
    ).tag(config=True)
    group_limits = Dict(
        key_trait=Unicode(),
        value_trait=Int(),
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
    def limit_for(self, who: Identity) -> int:
        if who.user in self.user_limits:
            return self.user_limits[who.user]
        by_group = [self.group_limits[g] for g in who.groups if g in self.group_limits]
        return max(by_group) if by_group else self.per_user_limit

    def check_quota(self, who: Identity, held: Sequence[Lease]) -> None:
        limit = self.limit_for(who)
        if len(held) >= limit:
            raise E.QuotaExceeded(
                f"user {who.user!r} already holds {len(held)} of {limit} allowed slice(s) "
                f"({', '.join(lease.id for lease in held)}); release one first"
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
    limit: Callable[[Ticket], int],
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
        if held[ticket.user] >= limit(ticket):
            continue
        record = best_fit(ticket.request, (r for r in free if may_use(ticket, r.info)))
        if record is None:
            continue
        free.remove(record)
        held[ticket.user] += 1
        grants.append((ticket, record))
    return grants
