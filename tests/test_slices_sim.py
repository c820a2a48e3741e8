"""The simulated node (mig_kernel.slices.sim)."""

from __future__ import annotations

import pytest

from mig_kernel.slices import (
    DEFAULT_SIM_LAYOUT,
    ApplyRefused,
    Isolation,
    LayoutError,
    SimInventory,
    SliceInfo,
    UnknownProfile,
)

MiB = 1024 * 1024
MIXED = "H100-80GB:3g.40gb,2g.20gb,1g.10gb,1g.10gb"


def test_default_layout_is_seven_small_slices() -> None:
    inv = SimInventory(DEFAULT_SIM_LAYOUT)
    assert inv.backend == "sim"
    slices = inv.slices()
    assert [s.id for s in slices] == [f"gpu0-s{k}" for k in range(7)]
    for k, s in enumerate(slices):
        assert s.profile == "1g.10gb"
        assert s.isolation is Isolation.SIM
        assert s.memory_total == 9984 * MiB
        assert s.memory_limit == s.memory_total
        assert s.sms == 16
        assert (s.placement_start, s.placement_size) == (k, 1)
        assert s.runtime == "numpy"
        assert s.env == {"CUDA_VISIBLE_DEVICES": ""}
        assert s.uuid.startswith("SIM-")
        assert s.gpu_index == 0
        assert inv.memory_used(s) is None
    assert len({s.uuid for s in slices}) == 7
    inv.close()  # nothing to release, but callable


def test_gpu_info() -> None:
    [gpu] = SimInventory(DEFAULT_SIM_LAYOUT).gpus()
    assert gpu.index == 0
    assert gpu.uuid.startswith("SIM-GPU-")
    assert gpu.name == "Simulated H100-80GB"
    assert gpu.card == "H100-80GB"
    assert gpu.memory_total == 81152 * MiB
    assert gpu.mig_enabled and gpu.simulated
    assert gpu.memory_slots == 8
    assert all(s.gpu_uuid == gpu.uuid for s in SimInventory(DEFAULT_SIM_LAYOUT).slices())


def test_uuids_are_stable_across_restarts() -> None:
    first, second = SimInventory(MIXED), SimInventory(MIXED)
    assert [s.uuid for s in first.slices()] == [s.uuid for s in second.slices()]
    assert first.gpus() == second.gpus()
    assert first.slices() == second.slices()


def test_mixed_layout_ids_follow_placement() -> None:
    slices = SimInventory(MIXED).slices()
    rows = [(s.id, s.profile, s.placement_start, s.placement_size) for s in slices]
    assert rows == [
        ("gpu0-s0", "2g.20gb", 0, 2),
        ("gpu0-s1", "1g.10gb", 2, 1),
        ("gpu0-s2", "1g.10gb", 3, 1),
        ("gpu0-s3", "3g.40gb", 4, 4),
    ]
    assert slices[3].memory_total == 40448 * MiB and slices[3].sms == 60


def test_several_gpus() -> None:
    inv = SimInventory("H100-80GB:7x1g.10gb;A100-40GB:3g.20gb,4g.20gb")
    gpus = inv.gpus()
    assert [g.card for g in gpus] == ["H100-80GB", "A100-40GB"]
    assert gpus[1].memory_total == 40192 * MiB
    assert gpus[0].uuid != gpus[1].uuid
    tail = [(s.id, s.profile, s.gpu_index, s.gpu_uuid) for s in inv.slices()[7:]]
    assert tail == [
        ("gpu1-s0", "4g.20gb", 1, gpus[1].uuid),
        ("gpu1-s1", "3g.20gb", 1, gpus[1].uuid),
    ]


def test_same_profile_on_other_gpu_gets_another_uuid() -> None:
    inv = SimInventory("H100-80GB:7g.80gb;H100-80GB:7g.80gb")
    a, b = inv.slices()
    assert a.uuid != b.uuid


@pytest.mark.parametrize(
    ("layout", "error", "word"),
    [
        ("H100-80GB:4g.40gb,4g.40gb", LayoutError, "maximum of 1 instance"),
        ("H100-80GB:3g.40gb,3g.40gb,1g.10gb", LayoutError, "memory slots exhausted"),
        ("H100-80GB:1g.5gb", UnknownProfile, "valid profiles"),
        ("", LayoutError, "empty layout"),
    ],
)
def test_impossible_layout_refuses_to_start(layout: str, error: type[Exception], word: str) -> None:
    with pytest.raises(error, match=word):
        SimInventory(layout)


def test_apply_layout_replaces_one_gpu() -> None:
    inv = SimInventory("H100-80GB:7x1g.10gb;H100-80GB:7g.80gb")
    other = inv.slices()[7:]
    slices = inv.apply_layout(0, "3g.40gb,2g.20gb,1g.10gb,1g.10gb")
    assert slices == inv.slices()
    assert [(s.id, s.profile) for s in slices[:4]] == [
        ("gpu0-s0", "2g.20gb"),
        ("gpu0-s1", "1g.10gb"),
        ("gpu0-s2", "1g.10gb"),
        ("gpu0-s3", "3g.40gb"),
    ]
    assert slices[4:] == other
    # The same layout again gives the same uuids; the CARD: prefix is accepted.
    again = inv.apply_layout(0, "H100-80GB:1g.10gb,1g.10gb,2g.20gb,3g.40gb")
    assert [s.uuid for s in again] == [s.uuid for s in slices]


@pytest.mark.parametrize(
    ("gpu", "layout", "code", "word"),
    [
        (2, "7g.80gb", "no_such_gpu", "no GPU 2"),
        (-1, "7g.80gb", "no_such_gpu", "no GPU -1"),
        (0, "4g.40gb,4g.40gb", "layout_does_not_fit", "maximum of 1 instance"),
        (0, "8x1g.10gb", "layout_does_not_fit", "maximum of 7"),
        (0, "1g.5gb", "layout_does_not_fit", "valid profiles"),
        (0, "A100-40GB:7g.40gb", "layout_does_not_fit", "layout is for A100-40GB"),
        (0, "", "layout_does_not_fit", "empty"),
    ],
)
def test_apply_layout_refusals_leave_the_node_unchanged(
    gpu: int, layout: str, code: str, word: str
) -> None:
    inv = SimInventory("H100-80GB:7x1g.10gb;H100-80GB:7g.80gb")
    before = inv.slices()
    with pytest.raises(ApplyRefused) as err:
        inv.apply_layout(gpu, layout)
    assert err.value.code == code
    assert word in str(err.value)
    assert inv.slices() == before


def test_slice_json_round_trip() -> None:
    for s in SimInventory(MIXED).slices():
        data = s.to_json()
        assert data["isolation"] == "sim"
        assert SliceInfo.from_json(data) == s
