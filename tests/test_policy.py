"""The lease policy as plain functions: no broker, no sockets (broker/policy.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from mig_kernel.broker.identity import Identity
from mig_kernel.broker.policy import (
    Holding,
    LeasePolicy,
    best_fit,
    check_satisfiable,
    describe,
    queue_grants,
)
from mig_kernel.broker.state import Request, SliceRecord, Ticket
from mig_kernel.slices.sim import SimInventory
from mig_kernel.wire import errors as E

ALICE = Identity("alice", uid=1001, groups=("alice", "students"))
BOB = Identity("bob", uid=1002, groups=("bob", "staff"))
ROOT = Identity("root", uid=0, groups=("root",))


@pytest.fixture
def records() -> list[SliceRecord]:
    inventory = SimInventory("H100-80GB:3g.40gb,2g.20gb,1g.10gb,1g.10gb")
    return [SliceRecord(info) for info in inventory.slices()]


def held(owner: str, n: int, label: str | None = None) -> Holding:
    return Holding(f"L-{owner}{n}", f"gpu0-s{n}", "1g.10gb", 75.0, label, f"kernel:{owner}{n}")


def ticket(user: str, n: int, request: Request | None = None) -> Ticket:
    return Ticket(f"T-{n}", f"C-{user}", user, request or Request(), n, None, b"", b"", n)


def test_admins_are_named_users_groups_and_root() -> None:
    policy = LeasePolicy(admin_users={"bob"}, admin_groups={"gpu-admins"})
    assert policy.is_admin(BOB) and policy.is_admin(ROOT)
    assert not policy.is_admin(ALICE)
    assert policy.is_admin(Identity("carol", uid=1003, groups=("gpu-admins",)))
    assert not LeasePolicy().is_admin(ALICE)  # nobody but root by default


def test_allowed_users_and_groups() -> None:
    LeasePolicy().check_allowed(ALICE)  # nothing configured: every local user
    policy = LeasePolicy(allowed_groups={"staff"})
    policy.check_allowed(BOB)
    policy.check_allowed(ROOT)  # an admin always may
    with pytest.raises(E.NotPermitted, match=r"'alice' is not allowed .*group staff"):
        policy.check_allowed(ALICE)


def test_limits_per_user_group_and_default() -> None:
    policy = LeasePolicy(
        per_user_limit=1, user_limits={"alice": 3}, group_limits={"staff": 2, "bob": 5}
    )
    assert policy.limit_for(ALICE) == 3  # the user's own wins over groups
    assert policy.limit_for(BOB) == 5  # the largest of the user's groups
    assert policy.limit_for(Identity("dave", groups=("dave",))) == 1
    policy.check_quota(BOB, [held("bob", 1)] * 4)
    with pytest.raises(E.QuotaExceeded, match=r"holds 1 of 1 .*L-dave1"):
        policy.check_quota(Identity("dave"), [held("dave", 1)])


def test_a_limit_of_all_and_what_a_wait_at_the_limit_says() -> None:
    policy = LeasePolicy(per_user_limit="all", group_limits={"students": 1})
    assert policy.limit_for(BOB) is None and not policy.at_limit(BOB, 28)
    assert policy.limit_for(ALICE) == 1 and policy.at_limit(ALICE, 1)
    assert (
        LeasePolicy(group_limits={"a": 2, "b": "all"}).limit_for(Identity("x", groups=("a", "b")))
        is None
    )  # the largest of the user's groups
    assert policy.quota_wait(BOB, [held("bob", 1)]) is None
    reason = policy.quota_wait(ALICE, [held("alice", 1, "~/demos/quickstart.ipynb")])
    assert reason is not None
    assert reason.startswith("you hold 1 of the 1 GPU slice(s) one user may hold here: ")
    assert "~/demos/quickstart.ipynb (1g.10gb on gpu0-s1, idle 1:15, lease L-alice1)" in reason
    assert "`%gpu release` in that notebook" in reason and "GPU slices panel" in reason
    unlabelled = policy.quota_wait(ALICE, [held("alice", 2)])
    assert unlabelled is not None and "the notebook of kernel alice2" in unlabelled


def test_profiles_per_group(records: list[SliceRecord]) -> None:
    infos = [r.info for r in records]
    policy = LeasePolicy(allowed_profiles={"*": ["1g.10gb"], "staff": ["2g.20gb"]})
    assert policy.profiles_for(ALICE) == {"1g.10gb"}
    assert policy.profiles_for(BOB) == {"1g.10gb", "2g.20gb"}
    assert policy.profiles_for(Identity("root", admin=True, uid=0)) is None
    policy.check_request(ALICE, Request("1g.10gb"), infos)
    with pytest.raises(E.NotPermitted, match=r"may not lease profile 3g.40gb.*1g.10gb"):
        policy.check_request(ALICE, Request("3g.40gb"), infos)
    with pytest.raises(E.NotPermitted):  # 15 GiB fits only slices alice may not use
        policy.check_request(ALICE, Request(memory=15 * 2**30), infos)
    policy.check_request(BOB, Request(memory=15 * 2**30), infos)
    with pytest.raises(E.UnknownProfileError, match=r"offers 1g\.10gb, 2g\.20gb, 3g\.40gb"):
        policy.check_request(BOB, Request("7g.80gb"), infos)
    assert [policy.may_use(ALICE, i) for i in infos].count(True) == 2


def test_may_manage_own_or_as_admin() -> None:
    policy = LeasePolicy()
    assert policy.may_manage(ALICE, "alice")
    assert not policy.may_manage(ALICE, "bob")
    assert policy.may_manage(Identity("root", admin=True, uid=0), "bob")


def test_best_fit_is_the_smallest_slice_that_satisfies(records: list[SliceRecord]) -> None:
    assert best_fit(Request(), records).info.profile == "1g.10gb"
    assert best_fit(Request(memory=11 * 2**30), records).info.profile == "2g.20gb"
    assert best_fit(Request("3g.40gb"), records).info.profile == "3g.40gb"
    assert best_fit(Request(memory=50 * 2**30), records) is None
    with pytest.raises(E.NoSuchSlice, match=r"largest: 39\.5 GiB"):
        check_satisfiable(Request(memory=50 * 2**30), [r.info for r in records])
    assert describe(Request("1g.10gb", 2**30)) == "profile 1g.10gb and 1.00 GiB of memory"


def test_queue_grants_oldest_first_skipping_users_at_their_limit(
    records: list[SliceRecord],
) -> None:
    small = [r for r in records if r.info.profile == "1g.10gb"]
    queue = [ticket("alice", 1), ticket("alice", 2), ticket("bob", 3), ticket("carol", 4)]
    grants = queue_grants(queue, small, Counter({"alice": 0}), lambda t: 1, lambda t, info: True)
    # alice's second request waits for her limit; bob overtakes it; carol finds nothing free
    assert [(t.id, r.info.id) for t, r in grants] == [
        ("T-1", small[0].info.id),
        ("T-3", small[1].info.id),
    ]


def test_queue_grants_respect_allowed_profiles(records: list[SliceRecord]) -> None:
    queue = [ticket("alice", 1, Request(memory=15 * 2**30)), ticket("bob", 2)]
    only_small = {"alice": {"1g.10gb"}}

    def may_use(t: Ticket, info: object) -> bool:
        return info.profile in only_small.get(t.user, {info.profile})  # type: ignore[attr-defined]

    grants = queue_grants(queue, records, Counter(), lambda t: 1, may_use)
    assert [(t.user, r.info.profile) for t, r in grants] == [("bob", "1g.10gb")]
