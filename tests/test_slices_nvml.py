"""The NVML backend against the in-repo fake pynvml (tests/fakes), and make_inventory."""

from __future__ import annotations

import ctypes
import types
from typing import Any

import pytest

from mig_kernel.slices import (
    ApplyRefused,
    Inventory,
    Isolation,
    SimInventory,
    SliceError,
    make_inventory,
)
from mig_kernel.slices.nvml import NvmlInventory, whole_gpu_profile
from mig_kernel.slices.profiles import CARDS
from tests.fakes import (
    H100_80GB_HBM3_MEMORY_TOTAL,
    H100_80GB_PROFILES,
    FakeGpu,
    FakeNode,
    FakeNvml,
    FakeProcess,
    make_fake_pynvml,
    make_fake_pynvml_without_driver,
)

MiB = 1024 * 1024
H100 = CARDS["H100-80GB"]
MIXED = "3g.40gb,2g.20gb,1g.10gb,1g.10gb"
NAME_TO_ENUM = {p.name: enum for enum, p in H100_80GB_PROFILES.items()}


# --------------------------------------------------------------------------- helpers


def create(nv: types.ModuleType, gpu_index: int, profile: str, start: int) -> Any:
    """Make one MIG device through the fake's NVML calls, as an admin tool would."""
    h = nv.nvmlDeviceGetHandleByIndex(gpu_index)
    info = nv.nvmlDeviceGetGpuInstanceProfileInfo(h, NAME_TO_ENUM[profile])
    placement = nv.c_nvmlGpuInstancePlacement_t()
    placement.start = start
    placement.size = H100_80GB_PROFILES[NAME_TO_ENUM[profile]].size
    gi = nv.nvmlDeviceCreateGpuInstanceWithPlacement(h, info.id, ctypes.byref(placement))
    ci_enum = getattr(nv, f"NVML_COMPUTE_INSTANCE_PROFILE_{info.sliceCount}_SLICE")
    ci_info = nv.nvmlGpuInstanceGetComputeInstanceProfileInfo(
        gi, ci_enum, nv.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
    )
    nv.nvmlGpuInstanceCreateComputeInstance(gi, ci_info.id)
    return gi


def node_with(*gpus: FakeGpu, **layouts: list[tuple[str, int]]) -> types.ModuleType:
    """A fake module over ``gpus``; ``gpuN=[(profile, start), ...]`` pre-creates instances."""
    nv = make_fake_pynvml(FakeNode(gpus=list(gpus)))
    nv.nvmlInit()
    for key, instances in layouts.items():
        for profile, start in instances:
            create(nv, int(key.removeprefix("gpu")), profile, start)
    nv.nvmlShutdown()
    nv.node.log.clear()
    nv.node.mutating_calls = 0
    return nv


def seven_small() -> list[tuple[str, int]]:
    return [("1g.10gb", s) for s in range(7)]


@pytest.fixture
def inventories() -> Any:
    """Builds NvmlInventory objects and closes every one at the end."""
    made: list[Inventory] = []

    def build(nv: Any, share: int = 1) -> NvmlInventory:
        inv = NvmlInventory(share=share, nvml=nv)
        made.append(inv)
        return inv

    yield build
    for inv in made:
        inv.close()


# --------------------------------------------------------------------------- the fake itself


def test_fake_errors_map_codes_to_subclasses_like_pynvml() -> None:
    nv = make_fake_pynvml()
    err = nv.NVMLError(6)
    assert isinstance(err, nv.NVMLError_NotFound) and isinstance(err, nv.NVMLError)
    assert err.value == nv.NVML_ERROR_NOT_FOUND == 6
    assert nv.NVMLError_InsufficientResources().value == 23
    assert nv.nvmlExceptionClass(19) is nv.NVMLError_InUse
    assert str(nv.NVMLError_NoPermission()) == "Insufficient Permissions"
    codes = {
        "NVML_ERROR_INVALID_ARGUMENT": 2,
        "NVML_ERROR_NOT_SUPPORTED": 3,
        "NVML_ERROR_NO_PERMISSION": 4,
        "NVML_ERROR_NOT_FOUND": 6,
        "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
        "NVML_ERROR_IN_USE": 19,
        "NVML_ERROR_INSUFFICIENT_RESOURCES": 23,
    }
    assert {name: getattr(nv, name) for name in codes} == codes


def test_fake_constants_match_the_real_pynvml() -> None:
    real = pytest.importorskip("pynvml")
    fake = make_fake_pynvml()
    names = [n for n in dir(fake) if n.startswith("NVML_")]
    assert len(names) > 40
    for name in names:
        if hasattr(real, name):
            assert getattr(fake, name) == getattr(real, name), name
    for name in ("c_nvmlGpuInstancePlacement_t", "c_nvmlDeviceAttributes", "c_nvmlMemory_t"):
        assert [f[0] for f in getattr(fake, name)._fields_] == [
            f[0] for f in getattr(real, name)._fields_
        ]


def test_fake_refuses_calls_before_init_and_without_a_driver() -> None:
    nv = make_fake_pynvml()
    with pytest.raises(nv.NVMLError_Uninitialized):
        nv.nvmlDeviceGetCount()
    bare = make_fake_pynvml_without_driver()
    with pytest.raises(bare.NVMLError_LibraryNotFound):
        bare.nvmlInit()
    fake_object = FakeNvml(FakeNode())  # the object form stands in for the module too
    assert fake_object.NVML_ERROR_IN_USE == 19
    fake_object.nvmlInit()
    assert fake_object.nvmlDeviceGetCount() == 1


def test_profile_table_read_through_nvml_matches_the_card_model() -> None:
    nv = make_fake_pynvml()
    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)
    seen = set()
    for profile in H100.profiles:
        info = nv.nvmlDeviceGetGpuInstanceProfileInfo(h, profile.nvml_enum)
        assert info.name.decode() == f"MIG {profile.name}"
        assert info.id == profile.profile_id
        assert info.sliceCount == profile.compute_slices
        assert info.instanceCount == profile.max_count
        assert info.multiprocessorCount == profile.sms
        assert info.copyEngineCount == profile.copy_engines
        assert info.memorySizeMB == profile.memory_mb
        fake_row = H100_80GB_PROFILES[profile.nvml_enum]
        assert (fake_row.starts, fake_row.size) == (profile.starts, profile.size)
        seen.add(profile.nvml_enum)
    assert seen == set(H100_80GB_PROFILES)


def test_enums_are_not_ids_and_other_enums_are_refused() -> None:
    nv = make_fake_pynvml()
    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)
    three = nv.nvmlDeviceGetGpuInstanceProfileInfo(h, nv.NVML_GPU_INSTANCE_PROFILE_3_SLICE)
    assert (nv.NVML_GPU_INSTANCE_PROFILE_3_SLICE, three.id) == (2, 9)
    # As measured on the H100 (driver 580): NotSupported for the other enums it knows,
    # InvalidArgument from 0x11 (3_SLICE_GFX) on, though pynvml's COUNT is 0x12.
    for enum in range(nv.NVML_GPU_INSTANCE_PROFILE_COUNT + 2):
        if enum in H100_80GB_PROFILES:
            continue
        expected = nv.NVMLError_NotSupported if enum < 0x11 else nv.NVMLError_InvalidArgument
        with pytest.raises(expected):
            nv.nvmlDeviceGetGpuInstanceProfileInfo(h, enum)
    # Creating with the enum instead of the id is a caller bug the fake catches.
    node = FakeNode(gpus=[FakeGpu(mig_mode=1)])
    nv = make_fake_pynvml(node)
    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)
    placement = nv.c_nvmlGpuInstancePlacement_t(start=0, size=4)
    with pytest.raises(nv.NVMLError_InvalidArgument):
        nv.nvmlDeviceCreateGpuInstanceWithPlacement(h, 2, ctypes.byref(placement))


def test_fake_enforces_mig_rules() -> None:
    nv = node_with(FakeGpu(mig_mode=1))
    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)

    def attempt(profile_id: int, start: int, size: int, by_ref: bool = True) -> Any:
        placement = nv.c_nvmlGpuInstancePlacement_t(start=start, size=size)
        arg = ctypes.byref(placement) if by_ref else placement
        return nv.nvmlDeviceCreateGpuInstanceWithPlacement(h, profile_id, arg)

    with pytest.raises(TypeError, match="byref"):
        attempt(9, 4, 4, by_ref=False)
    with pytest.raises(nv.NVMLError_InvalidArgument):  # 3g cannot start at 2
        attempt(9, 2, 4)
    gi = attempt(9, 4, 4)
    with pytest.raises(nv.NVMLError_InsufficientResources):  # overlaps the 3g
        attempt(19, 5, 1)
    attempt(5, 0, 4)  # 4g at 0
    with pytest.raises(nv.NVMLError_InsufficientResources):  # a second 4g
        attempt(5, 0, 4)
    ci_info = nv.nvmlGpuInstanceGetComputeInstanceProfileInfo(
        gi, nv.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE, nv.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
    )
    with pytest.raises(nv.NVMLError_NotSupported):  # a 4-slice CI in a 3-slice GI
        nv.nvmlGpuInstanceGetComputeInstanceProfileInfo(
            gi,
            nv.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE,
            nv.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
        )
    ci = nv.nvmlGpuInstanceCreateComputeInstance(gi, ci_info.id)
    with pytest.raises(nv.NVMLError_InUse):  # GI before its CI
        nv.nvmlGpuInstanceDestroy(gi)
    mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, 0)
    assert nv.nvmlDeviceIsMigDeviceHandle(mig).value == 1
    assert nv.nvmlDeviceIsMigDeviceHandle(h).value == 0
    assert nv.nvmlDeviceGetUUID(mig).startswith("MIG-")
    assert nv.nvmlDeviceGetMemoryInfo(mig).total == 40448 * MiB
    attrs = nv.nvmlDeviceGetAttributes(mig)
    assert (attrs.multiprocessorCount, attrs.gpuInstanceSliceCount) == (60, 3)
    with pytest.raises(nv.NVMLError_NotFound):
        nv.nvmlDeviceGetMigDeviceHandleByIndex(h, 1)
    nv.nvmlComputeInstanceDestroy(ci)
    nv.nvmlGpuInstanceDestroy(gi)
    assert [entry[0] for entry in nv.node.log] == [
        "create_gi",
        "create_gi",
        "create_ci",
        "destroy_ci",
        "destroy_gi",
    ]


def test_fake_refuses_without_mig_or_root() -> None:
    nv = node_with(FakeGpu(mig_mode=0), FakeGpu(mig_mode=1, root=False))
    nv.nvmlInit()
    placement = nv.c_nvmlGpuInstancePlacement_t(start=0, size=8)
    off, user = nv.nvmlDeviceGetHandleByIndex(0), nv.nvmlDeviceGetHandleByIndex(1)
    assert nv.nvmlDeviceGetMigMode(off) == [0, 0]
    assert nv.nvmlDeviceGetMaxMigDeviceCount(off) == 0
    assert nv.nvmlDeviceGetMaxMigDeviceCount(user) == 7
    with pytest.raises(nv.NVMLError_NotSupported):
        nv.nvmlDeviceCreateGpuInstanceWithPlacement(off, 0, ctypes.byref(placement))
    with pytest.raises(nv.NVMLError_NoPermission):
        nv.nvmlDeviceCreateGpuInstanceWithPlacement(user, 0, ctypes.byref(placement))
    assert nv.node.mutating_calls == 2 and nv.node.log == []


def test_first_fit_creation_fails_the_mixed_layout_that_placement_fits() -> None:
    """gpu-facts.md: creating the 3g first at its first free placement strands the last 1g."""
    nv = node_with(FakeGpu(mig_mode=1))
    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)
    for profile_id in (9, 14, 19):  # 3g, 2g, 1g by first fit
        nv.nvmlDeviceCreateGpuInstance(h, profile_id)
    with pytest.raises(nv.NVMLError_InsufficientResources):
        nv.nvmlDeviceCreateGpuInstance(h, 19)


# --------------------------------------------------------------------------- discovery


def test_discovery_of_a_mig_layout(inventories: Any) -> None:
    # Created out of placement order: ids must still follow the placement.
    nv = node_with(
        FakeGpu(mig_mode=1),
        gpu0=[("1g.10gb", 3), ("3g.40gb", 4), ("2g.20gb", 0), ("1g.10gb", 2)],
    )
    inv = inventories(nv)
    assert inv.backend == "nvml"
    [gpu] = inv.gpus()
    assert gpu.card == "H100-80GB" and gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.mig_enabled and gpu.memory_slots == 8 and not gpu.simulated
    assert gpu.memory_total == H100_80GB_HBM3_MEMORY_TOTAL
    assert gpu.uuid.startswith("GPU-")
    slices = inv.slices()
    rows = [(s.id, s.profile, s.placement_start, s.placement_size, s.sms) for s in slices]
    assert rows == [
        ("gpu0-s0", "2g.20gb", 0, 2, 32),
        ("gpu0-s1", "1g.10gb", 2, 1, 16),
        ("gpu0-s2", "1g.10gb", 3, 1, 16),
        ("gpu0-s3", "3g.40gb", 4, 4, 60),
    ]
    migs = {nv.nvmlDeviceGetUUID(m) for m in nv.node.mig_devices(0)}
    assert {s.uuid for s in slices} == migs
    for s in slices:
        assert s.uuid.startswith("MIG-")
        assert s.isolation is Isolation.MIG
        assert s.runtime == "cupy"
        assert s.memory_limit is None
        assert s.env == {"CUDA_VISIBLE_DEVICES": s.uuid}
        assert s.gpu_uuid == gpu.uuid
        assert s.memory_total == H100.profile(s.profile).memory_mb * MiB
    assert nv.node.mutating_calls == 0  # discovery is read-only


def test_memory_used_per_mig_device(inventories: Any) -> None:
    nv = node_with(FakeGpu(mig_mode=1), gpu0=[("3g.40gb", 0), ("3g.40gb", 4)])
    inv = inventories(nv)
    first, second = inv.slices()
    for mig in nv.node.mig_devices(0):
        if mig.uuid == second.uuid:
            mig.memory_used = 123 * MiB
    assert inv.memory_used(second) == 123 * MiB
    assert inv.memory_used(first) == 0
    fresh = inventories(nv)  # memory_used works before slices() was ever called
    assert fresh.memory_used(second) == 123 * MiB


def test_mig_disabled_gpu_is_one_process_slice(inventories: Any) -> None:
    nv = node_with(FakeGpu(mig_mode=0, memory_used=5 * MiB))
    inv = inventories(nv)
    [gpu] = inv.gpus()
    assert not gpu.mig_enabled and gpu.memory_slots == 8 and gpu.card == "H100-80GB"
    [s] = inv.slices()
    assert s.id == "gpu0-s0"
    assert s.profile == "gpu.80gb"
    assert s.isolation is Isolation.PROCESS
    assert s.uuid == gpu.uuid == s.gpu_uuid
    assert s.memory_total == H100_80GB_HBM3_MEMORY_TOTAL
    assert s.memory_limit is None and s.runtime == "cupy"
    assert s.sms is None  # NVML has no attributes for a whole GPU (NotSupported, as measured)
    assert s.env == {"CUDA_VISIBLE_DEVICES": gpu.uuid}
    assert inv.memory_used(s) is None  # the executor reports its own use


def test_mig_disabled_gpu_shared_four_ways(inventories: Any) -> None:
    nv = node_with(FakeGpu(mig_mode=0))
    inv = inventories(nv, share=4)
    [gpu] = inv.gpus()
    slices = inv.slices()
    assert [s.id for s in slices] == ["gpu0-s0", "gpu0-s1", "gpu0-s2", "gpu0-s3"]
    assert len({s.uuid for s in slices}) == 4
    for s in slices:
        assert s.profile == "gpu-1of4.20gb"
        assert s.isolation is Isolation.PROCESS
        assert s.memory_total == s.memory_limit == H100_80GB_HBM3_MEMORY_TOTAL // 4
        assert s.env == {"CUDA_VISIBLE_DEVICES": gpu.uuid}
        assert s.uuid.startswith(gpu.uuid)


def test_whole_gpu_profile_names() -> None:
    assert whole_gpu_profile(H100_80GB_HBM3_MEMORY_TOTAL) == "gpu.80gb"
    assert whole_gpu_profile(H100_80GB_HBM3_MEMORY_TOTAL, 4) == "gpu-1of4.20gb"
    assert whole_gpu_profile(40960 * MiB, 2) == "gpu-1of2.20gb"


def test_share_must_be_positive() -> None:
    with pytest.raises(SliceError, match="share"):
        NvmlInventory(share=0, nvml=node_with(FakeGpu()))


def test_several_gpus_per_node(inventories: Any) -> None:
    nv = node_with(
        FakeGpu(mig_mode=1),
        FakeGpu(mig_mode=0),
        FakeGpu(name="Tesla T4", mig_capable=False, memory_total=16 * 2**30),
        gpu0=seven_small(),
    )
    inv = inventories(nv)
    gpus = inv.gpus()
    assert [(g.index, g.card, g.mig_enabled, g.memory_slots) for g in gpus] == [
        (0, "H100-80GB", True, 8),
        (1, "H100-80GB", False, 8),
        (2, None, False, 0),
    ]
    assert len({g.uuid for g in gpus}) == 3
    slices = inv.slices()
    assert [s.id for s in slices] == [f"gpu0-s{k}" for k in range(7)] + ["gpu1-s0", "gpu2-s0"]
    assert [s.profile for s in slices[7:]] == ["gpu.80gb", "gpu.16gb"]
    assert slices[8].gpu_index == 2 and slices[8].isolation is Isolation.PROCESS


def test_bytes_names_are_decoded(inventories: Any) -> None:
    nv = node_with(FakeGpu(mig_mode=1), gpu0=[("7g.80gb", 0)])
    nv.node.bytes_strings = True
    inv = inventories(nv)
    [gpu] = inv.gpus()
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.card == "H100-80GB"
    [s] = inv.slices()
    assert isinstance(s.uuid, str) and s.uuid.startswith("MIG-") and s.profile == "7g.80gb"


def test_unknown_card_takes_profile_names_from_nvml(inventories: Any) -> None:
    nv = node_with(
        FakeGpu(name="NVIDIA Future GPU", mig_mode=1), gpu0=[("4g.40gb", 0), ("1g.20gb", 6)]
    )
    inv = inventories(nv)
    [gpu] = inv.gpus()
    assert gpu.card is None and gpu.memory_slots == 0
    assert [(s.profile, s.placement_start) for s in inv.slices()] == [
        ("4g.40gb", 0),
        ("1g.20gb", 6),
    ]


def test_unprivileged_discovery_infers_profiles_without_placements(inventories: Any) -> None:
    nv = node_with(
        FakeGpu(mig_mode=1),
        FakeGpu(name="NVIDIA Future GPU", mig_mode=1),
        gpu0=[("1g.20gb", 6), ("3g.40gb", 0)],
        gpu1=[("7g.80gb", 0)],
    )
    for gpu in nv.node.gpus:
        gpu.root = False
    slices = inventories(nv).slices()
    rows = [(s.id, s.profile, s.placement_start, s.isolation) for s in slices]
    assert rows == [
        ("gpu0-s0", "1g.20gb", None, Isolation.MIG),  # NVML's order when placement is unknown
        ("gpu0-s1", "3g.40gb", None, Isolation.MIG),
        ("gpu1-s0", "7g.80gb", None, Isolation.MIG),
    ]


def test_discovery_errors_become_slice_errors(inventories: Any) -> None:
    nv = node_with(FakeGpu(mig_mode=1))
    inv = inventories(nv)
    nv.node.fail_next("nvmlDeviceGetCount", nv.NVML_ERROR_GPU_IS_LOST)
    with pytest.raises(SliceError, match="NVML query failed: GPU is lost"):
        inv.slices()


def test_init_errors_propagate_and_close_shuts_down() -> None:
    bare = make_fake_pynvml_without_driver()
    with pytest.raises(bare.NVMLError_LibraryNotFound):
        NvmlInventory(nvml=bare)
    nv = node_with(FakeGpu())
    inv = NvmlInventory(nvml=nv)
    inv.close()
    inv.close()  # idempotent
    with pytest.raises(nv.NVMLError_Uninitialized):
        nv.nvmlDeviceGetCount()


# --------------------------------------------------------------------------- apply_layout


def test_apply_layout_destroys_then_creates_at_the_planned_placements(inventories: Any) -> None:
    nv = node_with(FakeGpu(mig_mode=1), gpu0=seven_small())
    inv = inventories(nv)
    before = {s.uuid for s in inv.slices()}
    slices = inv.apply_layout(0, MIXED)
    log = nv.node.log
    kinds = [entry[0] for entry in log]
    # Every compute instance goes before any GPU instance, and all before the first create.
    assert kinds[:14] == ["destroy_ci"] * 7 + ["destroy_gi"] * 7
    destroyed_gis = {entry[2] for entry in log if entry[0] == "destroy_ci"}
    assert destroyed_gis == {entry[2] for entry in log if entry[0] == "destroy_gi"}
    creates = log[14:]
    assert [c[0] for c in creates] == ["create_gi", "create_ci"] * 4
    assert {(c[2], c[3], c[4]) for c in creates if c[0] == "create_gi"} == {
        (9, 4, 4),  # the 3g at slot 4: what first fit gets wrong
        (14, 0, 2),
        (19, 2, 1),
        (19, 3, 1),
    }
    rows = [(s.id, s.profile, s.placement_start) for s in slices]
    assert rows == [
        ("gpu0-s0", "2g.20gb", 0),
        ("gpu0-s1", "1g.10gb", 2),
        ("gpu0-s2", "1g.10gb", 3),
        ("gpu0-s3", "3g.40gb", 4),
    ]
    assert not before & {s.uuid for s in slices}
    assert slices == inv.slices()


def test_apply_layout_accepts_the_card_prefix_and_an_empty_gpu(inventories: Any) -> None:
    nv = node_with(FakeGpu(mig_mode=1), FakeGpu(mig_mode=1), gpu1=[("7g.80gb", 0)])
    inv = inventories(nv)
    slices = inv.apply_layout(0, "H100-80GB:2x3g.40gb")
    assert [(s.id, s.profile) for s in slices] == [
        ("gpu0-s0", "3g.40gb"),
        ("gpu0-s1", "3g.40gb"),
        ("gpu1-s0", "7g.80gb"),
    ]
    assert all(entry[1] == 0 for entry in nv.node.log)  # GPU 1 untouched


def test_apply_layout_removes_gpu_instances_without_compute_instances(inventories: Any) -> None:
    nv = node_with(FakeGpu(mig_mode=1))
    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)
    orphan = nv.c_nvmlGpuInstancePlacement_t(start=0, size=8)
    nv.nvmlDeviceCreateGpuInstanceWithPlacement(h, 0, ctypes.byref(orphan))  # no CI: no MIG dev
    nv.nvmlShutdown()
    inv = inventories(nv)
    assert inv.slices() == []
    slices = inv.apply_layout(0, "7x1g.10gb")
    assert len(slices) == 7
    assert ("destroy_gi", 0, 0) in nv.node.log


def _refused(inv: NvmlInventory, gpu: int, layout: str) -> ApplyRefused:
    with pytest.raises(ApplyRefused) as err:
        inv.apply_layout(gpu, layout)
    return err.value


@pytest.mark.parametrize(
    ("gpu", "layout", "code", "words"),
    [
        (3, MIXED, "no_such_gpu", ["no GPU 3", "2 GPU(s)"]),
        (1, MIXED, "mig_disabled", ["MIG mode disabled", "nvidia-smi -i 1 -mig 1"]),
        (0, "4g.40gb,4g.40gb", "layout_does_not_fit", ["maximum of 1 instance"]),
        (0, "3g.40gb,3g.40gb,1g.10gb", "layout_does_not_fit", ["memory slots exhausted"]),
        (0, "8x1g.10gb", "layout_does_not_fit", ["maximum of 7 instances"]),
        (0, "2x1g.10gb+me", "layout_does_not_fit", ["maximum of 1 instance"]),
        (0, "1g.5gb", "layout_does_not_fit", ["valid profiles"]),
        (0, "A100-40GB:7g.40gb", "layout_does_not_fit", ["layout is for A100-40GB"]),
    ],
)
def test_refusals_before_touching_the_gpu(
    inventories: Any, gpu: int, layout: str, code: str, words: list[str]
) -> None:
    nv = node_with(FakeGpu(mig_mode=1), FakeGpu(mig_mode=0), gpu0=seven_small())
    inv = inventories(nv)
    before = inv.slices()
    refusal = _refused(inv, gpu, layout)
    assert refusal.code == code
    for word in words:
        assert word in str(refusal)
    assert nv.node.mutating_calls == 0
    assert inv.slices() == before


def test_refused_while_processes_run(inventories: Any) -> None:
    nv = node_with(
        FakeGpu(mig_mode=1, processes=[FakeProcess(pid=4242, usedGpuMemory=MiB), 17]),
        gpu0=seven_small(),
    )
    refusal = _refused(inventories(nv), 0, MIXED)
    assert refusal.code == "in_use"
    assert "pids 17, 4242" in str(refusal)
    assert nv.node.mutating_calls == 0


def test_refused_without_root(inventories: Any) -> None:
    nv = node_with(FakeGpu(mig_mode=1), gpu0=seven_small())
    nv.node.gpus[0].root = False
    inv = inventories(nv)
    before = inv.slices()
    refusal = _refused(inv, 0, MIXED)
    assert refusal.code == "no_permission"
    assert "root" in str(refusal) and "nothing on the GPU was changed" in str(refusal)
    assert nv.node.log == []
    assert inv.slices() == before


def test_refused_for_a_gpu_without_card_model(inventories: Any) -> None:
    nv = node_with(FakeGpu(name="NVIDIA Future GPU", mig_mode=1))
    refusal = _refused(inventories(nv), 0, "7g.80gb")
    assert refusal.code == "not_supported" and "known cards" in str(refusal)
    assert nv.node.mutating_calls == 0


@pytest.mark.parametrize(
    ("function", "code", "expected"),
    [
        ("nvmlDeviceCreateGpuInstanceWithPlacement", 23, "insufficient_resources"),
        ("nvmlDeviceCreateGpuInstanceWithPlacement", 3, "not_supported"),
        ("nvmlDeviceCreateGpuInstanceWithPlacement", 4, "no_permission"),
        ("nvmlComputeInstanceDestroy", 19, "in_use"),
        ("nvmlGpuInstanceDestroy", 999, "nvml_error"),
    ],
)
def test_nvml_errors_while_changing_map_to_refusals(
    inventories: Any, function: str, code: int, expected: str
) -> None:
    nv = node_with(FakeGpu(mig_mode=1), gpu0=[("7g.80gb", 0)])
    inv = inventories(nv)
    nv.node.fail_next(function, code)
    refusal = _refused(inv, 0, MIXED)
    assert refusal.code == expected
    assert "on GPU 0 failed: NVML" in str(refusal)
    if function == "nvmlComputeInstanceDestroy":
        assert "nothing on the GPU was changed" in str(refusal)
    else:
        assert "already done: destroyed compute instance" in str(refusal)


def test_failed_compute_instance_does_not_leave_a_bare_gpu_instance(inventories: Any) -> None:
    nv = node_with(FakeGpu(mig_mode=1))
    inv = inventories(nv)
    nv.node.fail_next("nvmlGpuInstanceCreateComputeInstance", nv.NVML_ERROR_INSUFFICIENT_RESOURCES)
    refusal = _refused(inv, 0, "7g.80gb")
    assert refusal.code == "insufficient_resources"
    assert [entry[0] for entry in nv.node.log] == ["create_gi", "destroy_gi"]
    assert nv.node.gpus[0].gpu_instances == {}


# --------------------------------------------------------------------------- make_inventory


def test_auto_falls_back_to_sim_without_a_driver() -> None:
    inv = make_inventory("auto", nvml=make_fake_pynvml_without_driver())
    assert isinstance(inv, SimInventory) and inv.backend == "sim"
    assert [s.profile for s in inv.slices()] == ["1g.10gb"] * 7


def test_auto_falls_back_to_sim_with_zero_gpus() -> None:
    nv = make_fake_pynvml(FakeNode(gpus=[]))
    inv = make_inventory("auto", sim_layout="H100-80GB:7g.80gb", nvml=nv)
    assert inv.backend == "sim" and [s.profile for s in inv.slices()] == ["7g.80gb"]
    with pytest.raises(nv.NVMLError_Uninitialized):  # the NVML session was closed again
        nv.nvmlDeviceGetCount()


def test_auto_picks_nvml_when_it_finds_a_gpu() -> None:
    nv = node_with(FakeGpu(mig_mode=0))
    inv = make_inventory("auto", share=2, nvml=nv)
    try:
        assert isinstance(inv, NvmlInventory) and inv.backend == "nvml"
        assert [s.profile for s in inv.slices()] == ["gpu-1of2.40gb"] * 2
    finally:
        inv.close()


def test_nvml_backend_says_why_it_is_unavailable() -> None:
    with pytest.raises(SliceError, match="NVML not available: NVML Shared Library Not Found"):
        make_inventory("nvml", nvml=make_fake_pynvml_without_driver())
    with pytest.raises(SliceError, match="NVML not available: NVML found no GPU"):
        make_inventory("nvml", nvml=make_fake_pynvml(FakeNode(gpus=[])))


def test_sim_and_unknown_backends() -> None:
    assert make_inventory("sim", nvml=node_with(FakeGpu())).backend == "sim"
    with pytest.raises(SliceError, match="unknown inventory backend 'cuda'"):
        make_inventory("cuda")


def test_auto_with_the_installed_pynvml_gives_a_working_inventory() -> None:
    """No fake: on a machine without a GPU this is the sim fallback, on a GPU node NVML."""
    inv = make_inventory("auto")
    try:
        assert inv.backend in {"sim", "nvml"}
        assert inv.gpus()  # a MIG GPU without instances has no slices, but it is listed
        inv.slices()
    finally:
        inv.close()
