"""An in-repo fake of the ``pynvml`` module (no NVML mock exists on PyPI).

It behaves as the measured H100 80GB HBM3 does (shared reference gpu-facts.md): the real
constant names and values, an ``NVMLError`` whose constructor picks the code's subclass, ctypes
structs with the real field names, and a node of GPUs whose MIG instances are created and
destroyed with NVML's rules (explicit placements, counts, no overlap, root only, compute
instances before their GPU instance).

The profile table below is copied from gpu-facts.md on purpose, not imported from
``mig_kernel.slices.profiles``: tests read it through the fake's NVML calls and compare it with
the project's model, so a typo in either shows up.

Not measured, only plausible: GPU instance ids (derived from the placement here), the order of
MIG device indices (creation order, lowest free index), MIG UUID values.

Usage::

    node = FakeNode(gpus=[FakeGpu(mig_mode=1)])
    pynvml = make_fake_pynvml(node)         # a module object with the pynvml API
    inv = NvmlInventory(nvml=pynvml)
    node.mutating_calls, node.log           # what the code under test changed
"""

from __future__ import annotations

import ctypes
import types
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# ----------------------------------------------------------------------------- constants
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_IN_USE = 19
NVML_ERROR_INSUFFICIENT_RESOURCES = 23
NVML_ERROR_UNKNOWN = 999

NVML_DEVICE_MIG_DISABLE = 0x0
NVML_DEVICE_MIG_ENABLE = 0x1

NVML_GPU_INSTANCE_PROFILE_1_SLICE = 0x0
NVML_GPU_INSTANCE_PROFILE_2_SLICE = 0x1
NVML_GPU_INSTANCE_PROFILE_3_SLICE = 0x2
NVML_GPU_INSTANCE_PROFILE_4_SLICE = 0x3
NVML_GPU_INSTANCE_PROFILE_7_SLICE = 0x4
NVML_GPU_INSTANCE_PROFILE_8_SLICE = 0x5
NVML_GPU_INSTANCE_PROFILE_6_SLICE = 0x6
NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1 = 0x7
NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1 = 0x8
NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2 = 0x9
NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX = 0xA
NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX = 0xB
NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX = 0xC
NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME = 0xD
NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME = 0xE
NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME = 0xF
NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME = 0x10
NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX = 0x11
NVML_GPU_INSTANCE_PROFILE_COUNT = 0x12

NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE = 0x0
NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE = 0x1
NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE = 0x2
NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE = 0x3
NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE = 0x4
NVML_COMPUTE_INSTANCE_PROFILE_8_SLICE = 0x5
NVML_COMPUTE_INSTANCE_PROFILE_6_SLICE = 0x6
NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE_REV1 = 0x7
NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE_NVL = 0x8
NVML_COMPUTE_INSTANCE_PROFILE_COUNT = 0x9

NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED = 0x0
NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_COUNT = 0x1

NVML_DEVICE_NAME_V2_BUFFER_SIZE = 96

# Driver 580 on the measured H100 knows profile enums below 0x11: it answered NotSupported for
# 5, 6, 8 and 0xA..0x10 but InvalidArgument for 0x11 (3_SLICE_GFX), although this pynvml's
# NVML_GPU_INSTANCE_PROFILE_COUNT is 0x12. The fake answers the same.
DRIVER_PROFILE_ENUM_LIMIT = 0x11

MiB = 1024 * 1024
H100_80GB_HBM3_MEMORY_TOTAL = 81559 * MiB  # 85520809984 bytes, as the real card reports
MAX_MIG_DEVICES = 7

# Compute-instance profile enum -> compute slices it takes.
_CI_SLICES = {0x0: 1, 0x1: 2, 0x2: 3, 0x3: 4, 0x4: 7, 0x5: 8, 0x6: 6, 0x7: 1, 0x8: 7}

# ----------------------------------------------------------------------------- errors
_ERROR_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_IN_USE: "In use by another client",
    NVML_ERROR_INSUFFICIENT_RESOURCES: "Insufficient resources",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like pynvml's: ``NVMLError(code)`` returns an instance of the code's subclass."""

    _valClassMapping: dict[int, type[NVMLError]] = {}
    value: int

    def __new__(cls, value: int = NVML_ERROR_UNKNOWN) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML Error with code {self.value}")


def _error_class(name: str, code: int) -> type[NVMLError]:
    def __new__(cls: type[NVMLError], *args: object) -> NVMLError:
        return NVMLError.__new__(cls, code)

    klass = type(name, (NVMLError,), {"__new__": __new__, "__module__": __name__})
    NVMLError._valClassMapping[code] = klass
    return klass


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_AlreadyInitialized = _error_class(
    "NVMLError_AlreadyInitialized", NVML_ERROR_ALREADY_INITIALIZED
)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_InsufficientSize = _error_class(
    "NVMLError_InsufficientSize", NVML_ERROR_INSUFFICIENT_SIZE
)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_InUse = _error_class("NVMLError_InUse", NVML_ERROR_IN_USE)
NVMLError_InsufficientResources = _error_class(
    "NVMLError_InsufficientResources", NVML_ERROR_INSUFFICIENT_RESOURCES
)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)


def nvmlExceptionClass(nvmlErrorCode: int) -> type[NVMLError]:
    if nvmlErrorCode not in NVMLError._valClassMapping:
        raise ValueError(f"nvmlErrorCode {nvmlErrorCode} is not valid")
    return NVMLError._valClassMapping[nvmlErrorCode]


# ----------------------------------------------------------------------------- structs
class c_nvmlGpuInstancePlacement_t(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint), ("size", ctypes.c_uint)]


class c_nvmlGpuInstanceProfileInfo_v2_t(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("id", ctypes.c_uint),
        ("isP2pSupported", ctypes.c_uint),
        ("sliceCount", ctypes.c_uint),
        ("instanceCount", ctypes.c_uint),
        ("multiprocessorCount", ctypes.c_uint),
        ("copyEngineCount", ctypes.c_uint),
        ("decoderCount", ctypes.c_uint),
        ("encoderCount", ctypes.c_uint),
        ("jpegCount", ctypes.c_uint),
        ("ofaCount", ctypes.c_uint),
        ("memorySizeMB", ctypes.c_ulonglong),
        ("name", ctypes.c_char * NVML_DEVICE_NAME_V2_BUFFER_SIZE),
    ]


class c_nvmlComputeInstanceProfileInfo_v2_t(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("id", ctypes.c_uint),
        ("sliceCount", ctypes.c_uint),
        ("instanceCount", ctypes.c_uint),
        ("multiprocessorCount", ctypes.c_uint),
        ("sharedCopyEngineCount", ctypes.c_uint),
        ("sharedDecoderCount", ctypes.c_uint),
        ("sharedEncoderCount", ctypes.c_uint),
        ("sharedJpegCount", ctypes.c_uint),
        ("sharedOfaCount", ctypes.c_uint),
        ("name", ctypes.c_char * NVML_DEVICE_NAME_V2_BUFFER_SIZE),
    ]


class c_nvmlMemory_t(ctypes.Structure):
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


class c_nvmlDeviceAttributes(ctypes.Structure):
    _fields_ = [
        ("multiprocessorCount", ctypes.c_uint),
        ("sharedCopyEngineCount", ctypes.c_uint),
        ("sharedDecoderCount", ctypes.c_uint),
        ("sharedEncoderCount", ctypes.c_uint),
        ("sharedJpegCount", ctypes.c_uint),
        ("sharedOfaCount", ctypes.c_uint),
        ("gpuInstanceSliceCount", ctypes.c_uint),
        ("computeInstanceSliceCount", ctypes.c_uint),
        ("memorySizeMB", ctypes.c_ulonglong),
    ]


@dataclass
class c_nvmlGpuInstanceInfo_t:
    """The real one is a ctypes struct holding a device pointer; the fake holds the fake GPU."""

    device: Any
    id: int
    profileId: int
    placement: c_nvmlGpuInstancePlacement_t


# ----------------------------------------------------------------------------- the node
class FakeProfile(NamedTuple):
    name: str
    id: int
    sliceCount: int  # compute slices
    instanceCount: int  # the profile's maximum count
    multiprocessorCount: int
    copyEngineCount: int
    memorySizeMB: int
    starts: tuple[int, ...]
    size: int  # memory slots of each placement


# gpu-facts.md, "H100 80GB MIG GPU-instance profiles", keyed by NVML enum.
H100_80GB_PROFILES: dict[int, FakeProfile] = {
    0: FakeProfile("1g.10gb", 19, 1, 7, 16, 1, 9984, (0, 1, 2, 3, 4, 5, 6), 1),
    7: FakeProfile("1g.10gb+me", 20, 1, 1, 16, 1, 9984, (0, 1, 2, 3, 4, 5, 6), 1),
    9: FakeProfile("1g.20gb", 15, 1, 4, 26, 1, 20096, (0, 2, 4, 6), 2),
    1: FakeProfile("2g.20gb", 14, 2, 3, 32, 2, 20096, (0, 2, 4), 2),
    2: FakeProfile("3g.40gb", 9, 3, 2, 60, 3, 40448, (0, 4), 4),
    3: FakeProfile("4g.40gb", 5, 4, 1, 64, 4, 40448, (0,), 4),
    4: FakeProfile("7g.80gb", 0, 7, 1, 132, 8, 81152, (0,), 8),
}


@dataclass
class FakeProcess:
    """A compute process; ``gpuInstanceId``/``computeInstanceId`` place it on a MIG device."""

    pid: int
    usedGpuMemory: int = 0
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(eq=False)
class FakeMigDevice:
    """A MIG device handle: one compute instance of one GPU instance."""

    ci: FakeComputeInstance
    uuid: str
    index: int
    memory_used: int = 0


@dataclass(eq=False)
class FakeComputeInstance:
    """A compute instance handle."""

    gi: FakeGpuInstance
    id: int
    profile_id: int
    slices: int
    mig: FakeMigDevice | None = None
    destroyed: bool = False


@dataclass(eq=False)
class FakeGpuInstance:
    """A GPU instance handle."""

    gpu: FakeGpu
    id: int
    profile: FakeProfile
    start: int
    compute_instances: dict[int, FakeComputeInstance] = field(default_factory=dict)
    destroyed: bool = False


@dataclass(eq=False)
class FakeGpu:
    """One GPU of the fake node; it is also its own device handle."""

    name: str = "NVIDIA H100 80GB HBM3"
    mig_mode: int = 0
    pending_mig_mode: int | None = None
    memory_total: int = H100_80GB_HBM3_MEMORY_TOTAL
    memory_used: int = 0
    root: bool = True  # False: the caller is not privileged (create/destroy/GI lookup refused)
    processes: list[FakeProcess] = field(default_factory=list)  # bare pids are accepted too
    mig_capable: bool = True
    profiles: dict[int, FakeProfile] = field(default_factory=lambda: dict(H100_80GB_PROFILES))
    uuid: str = ""
    index: int = -1
    gpu_instances: dict[int, FakeGpuInstance] = field(default_factory=dict)
    mig_slots: list[FakeMigDevice | None] = field(default_factory=lambda: [None] * MAX_MIG_DEVICES)

    def __post_init__(self) -> None:
        # A bare pid stands for a process on the whole GPU.
        self.processes = [
            p if isinstance(p, FakeProcess) else FakeProcess(pid=p) for p in self.processes
        ]


@dataclass
class FakeNode:
    """The fake machine; ``log``/``mutating_calls`` record what code under test changed."""

    gpus: list[FakeGpu] = field(default_factory=lambda: [FakeGpu()])
    driver_loaded: bool = True  # False: nvmlInit raises NVMLError_LibraryNotFound
    bytes_strings: bool = False  # True: names and UUIDs come back as bytes (older pynvml)
    log: list[tuple[Any, ...]] = field(default_factory=list)  # successful mutations, in order
    mutating_calls: int = 0  # create/destroy calls attempted, failed ones included
    fail: dict[str, int] = field(default_factory=dict)  # function name -> code, raised once

    def __post_init__(self) -> None:
        for index, gpu in enumerate(self.gpus):
            gpu.index = index
            if not gpu.uuid:
                gpu.uuid = f"GPU-{uuid.uuid5(uuid.NAMESPACE_OID, f'fake-gpu/{index}')}"

    def fail_next(self, function: str, code: int) -> None:
        """Make the next call of ``function`` raise NVMLError(code) (fault injection)."""
        self.fail[function] = code

    def mig_devices(self, gpu_index: int) -> list[FakeMigDevice]:
        return [m for m in self.gpus[gpu_index].mig_slots if m is not None]


def _gi_id(profile: FakeProfile, start: int) -> int:
    """A GPU instance id derived from its placement (plausible, unique; not measured)."""
    if profile.size >= 8:
        return 0
    if profile.size == 4:
        return 1 + start // 4
    if profile.size == 2:
        return 3 + start // 2
    return 7 + start


def _placement_arg(placement: Any) -> c_nvmlGpuInstancePlacement_t:
    """Unwrap ``byref(placement)`` / ``pointer(placement)``; a bare struct is a caller bug.

    The real binding hands ``placement`` straight to C, which expects a pointer: passing the
    struct by value would send garbage, so the fake refuses it loudly.
    """
    obj = getattr(placement, "_obj", None)  # ctypes.byref(...)
    if obj is None and hasattr(placement, "contents"):  # ctypes.pointer(...)
        obj = placement.contents
    if not isinstance(obj, c_nvmlGpuInstancePlacement_t):
        raise TypeError(
            "nvmlDeviceCreateGpuInstanceWithPlacement takes byref(c_nvmlGpuInstancePlacement_t)"
        )
    return obj


# ----------------------------------------------------------------------------- the API
class FakeNvml:
    """The pynvml functions over a FakeNode; ``make_fake_pynvml`` exposes them as a module."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self._init_count = 0
        self._serial = 0

    def __getattr__(self, name: str) -> Any:
        """Constants, error classes and structs, so the object itself can stand in for pynvml."""
        if name.startswith(_EXPORTED_PREFIXES) and name in globals():
            return globals()[name]
        raise AttributeError(name)

    # --- plumbing
    def _enter(self, function: str, mutating: bool = False) -> None:
        if self._init_count <= 0:
            raise NVMLError_Uninitialized()
        if mutating:
            self.node.mutating_calls += 1
        code = self.node.fail.pop(function, None)
        if code is not None:
            raise NVMLError(code)

    def _text(self, value: str) -> str | bytes:
        return value.encode() if self.node.bytes_strings else value

    def _gpu(self, handle: Any) -> FakeGpu:
        if not isinstance(handle, FakeGpu) or handle not in self.node.gpus:
            raise NVMLError_InvalidArgument()
        return handle

    def _mig(self, handle: Any) -> FakeMigDevice:
        if isinstance(handle, FakeGpu):
            raise NVMLError_NotSupported()  # a GPU handle where a MIG device handle belongs
        if not isinstance(handle, FakeMigDevice) or handle.ci.destroyed:
            raise NVMLError_InvalidArgument()
        return handle

    def _mig_gpu(self, handle: Any) -> FakeGpu:
        gpu = self._gpu(handle)
        if not gpu.mig_capable or gpu.mig_mode != NVML_DEVICE_MIG_ENABLE:
            raise NVMLError_NotSupported()
        return gpu

    @staticmethod
    def _live_gi(handle: Any) -> FakeGpuInstance:
        if not isinstance(handle, FakeGpuInstance) or handle.destroyed:
            raise NVMLError_InvalidArgument()
        return handle

    @staticmethod
    def _require_root(gpu: FakeGpu) -> None:
        if not gpu.root:
            raise NVMLError_NoPermission()

    # --- init
    def nvmlInit(self) -> None:
        self.nvmlInitWithFlags(0)

    def nvmlInitWithFlags(self, flags: int) -> None:
        if not self.node.driver_loaded:
            raise NVMLError_LibraryNotFound()
        self._init_count += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._enter("nvmlSystemGetDriverVersion")
        return self._text("580.159.04")

    # --- devices
    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.node.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.node.gpus):
            raise NVMLError_InvalidArgument()
        return self.node.gpus[index]

    def nvmlDeviceGetName(self, handle: Any) -> str | bytes:
        self._enter("nvmlDeviceGetName")
        if isinstance(handle, FakeMigDevice):
            gi = self._mig(handle).ci.gi
            return self._text(f"{gi.gpu.name} MIG {gi.profile.name}")
        return self._text(self._gpu(handle).name)

    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes:
        self._enter("nvmlDeviceGetUUID")
        if isinstance(handle, FakeMigDevice):
            return self._text(self._mig(handle).uuid)
        return self._text(self._gpu(handle).uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> c_nvmlMemory_t:
        self._enter("nvmlDeviceGetMemoryInfo")
        if isinstance(handle, FakeMigDevice):
            mig = self._mig(handle)
            total, used = mig.ci.gi.profile.memorySizeMB * MiB, mig.memory_used
        else:
            gpu = self._gpu(handle)
            total, used = gpu.memory_total, gpu.memory_used
        return c_nvmlMemory_t(total=total, free=total - used, used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[FakeProcess]:
        self._enter("nvmlDeviceGetComputeRunningProcesses")
        if isinstance(handle, FakeMigDevice):
            mig = self._mig(handle)
            return [
                FakeProcess(**vars(p))
                for p in mig.ci.gi.gpu.processes
                if p.gpuInstanceId == mig.ci.gi.id and p.computeInstanceId == mig.ci.id
            ]
        return [FakeProcess(**vars(p)) for p in self._gpu(handle).processes]

    nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses

    def nvmlDeviceGetAttributes(self, handle: Any) -> c_nvmlDeviceAttributes:
        """MIG devices only: the measured H100 (MIG off) answered NotSupported for its GPU."""
        self._enter("nvmlDeviceGetAttributes")
        ci = self._mig(handle).ci
        p = ci.gi.profile
        return c_nvmlDeviceAttributes(
            multiprocessorCount=p.multiprocessorCount * ci.slices // p.sliceCount,
            sharedCopyEngineCount=p.copyEngineCount,
            gpuInstanceSliceCount=p.sliceCount,
            computeInstanceSliceCount=ci.slices,
            memorySizeMB=p.memorySizeMB,
        )

    nvmlDeviceGetAttributes_v2 = nvmlDeviceGetAttributes

    # --- MIG mode and MIG devices
    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        self._enter("nvmlDeviceGetMigMode")
        gpu = self._gpu(handle)
        if not gpu.mig_capable:
            raise NVMLError_NotSupported()
        pending = gpu.mig_mode if gpu.pending_mig_mode is None else gpu.pending_mig_mode
        return [gpu.mig_mode, pending]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount")
        gpu = self._gpu(handle)
        if not gpu.mig_capable:
            raise NVMLError_NotSupported()
        return MAX_MIG_DEVICES if gpu.mig_mode == NVML_DEVICE_MIG_ENABLE else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> FakeMigDevice:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex")
        gpu = self._mig_gpu(handle)
        if not 0 <= index < MAX_MIG_DEVICES:
            raise NVMLError_InvalidArgument()
        mig = gpu.mig_slots[index]
        if mig is None:
            raise NVMLError_NotFound()
        return mig

    def nvmlDeviceIsMigDeviceHandle(self, handle: Any) -> ctypes.c_uint:
        self._enter("nvmlDeviceIsMigDeviceHandle")
        return ctypes.c_uint(1 if isinstance(handle, FakeMigDevice) else 0)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any) -> FakeGpu:
        self._enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
        return self._mig(handle).ci.gi.gpu

    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int:
        self._enter("nvmlDeviceGetGpuInstanceId")
        return self._mig(handle).ci.gi.id

    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int:
        self._enter("nvmlDeviceGetComputeInstanceId")
        return self._mig(handle).ci.id

    # --- GPU instance profiles and instances
    def nvmlDeviceGetGpuInstanceProfileInfo(
        self, handle: Any, profile: int, version: int = 2
    ) -> c_nvmlGpuInstanceProfileInfo_v2_t:
        self._enter("nvmlDeviceGetGpuInstanceProfileInfo")
        gpu = self._gpu(handle)
        if not gpu.mig_capable:
            raise NVMLError_NotSupported()
        if not 0 <= profile < DRIVER_PROFILE_ENUM_LIMIT:
            raise NVMLError_InvalidArgument()  # an enum newer than this driver knows
        p = gpu.profiles.get(profile)
        if p is None:
            raise NVMLError_NotSupported()
        return c_nvmlGpuInstanceProfileInfo_v2_t(
            version=0x02000098,
            id=p.id,
            sliceCount=p.sliceCount,
            instanceCount=p.instanceCount,
            multiprocessorCount=p.multiprocessorCount,
            copyEngineCount=p.copyEngineCount,
            memorySizeMB=p.memorySizeMB,
            name=f"MIG {p.name}".encode(),
        )

    nvmlDeviceGetGpuInstanceProfileInfoV = nvmlDeviceGetGpuInstanceProfileInfo

    def _profile_by_id(self, gpu: FakeGpu, profile_id: int) -> FakeProfile:
        for p in gpu.profiles.values():
            if p.id == profile_id:
                return p
        raise NVMLError_InvalidArgument()

    def _check_room(self, gpu: FakeGpu, profile: FakeProfile, start: int) -> None:
        same = [gi for gi in gpu.gpu_instances.values() if gi.profile.id == profile.id]
        if len(same) >= profile.instanceCount:
            raise NVMLError_InsufficientResources()
        taken = {
            s
            for gi in gpu.gpu_instances.values()
            for s in range(gi.start, gi.start + gi.profile.size)
        }
        if taken & set(range(start, start + profile.size)):
            raise NVMLError_InsufficientResources()
        compute = sum(gi.profile.sliceCount for gi in gpu.gpu_instances.values())
        if compute + profile.sliceCount > 7:
            raise NVMLError_InsufficientResources()

    def _add_gi(self, gpu: FakeGpu, profile: FakeProfile, start: int) -> FakeGpuInstance:
        gi = FakeGpuInstance(gpu=gpu, id=_gi_id(profile, start), profile=profile, start=start)
        gpu.gpu_instances[gi.id] = gi
        self.node.log.append(("create_gi", gpu.index, profile.id, start, profile.size))
        return gi

    def nvmlDeviceCreateGpuInstanceWithPlacement(
        self, handle: Any, profileId: int, placement: Any
    ) -> FakeGpuInstance:
        self._enter("nvmlDeviceCreateGpuInstanceWithPlacement", mutating=True)
        gpu = self._mig_gpu(handle)
        self._require_root(gpu)
        place = _placement_arg(placement)
        profile = self._profile_by_id(gpu, profileId)
        if place.start not in profile.starts or place.size != profile.size:
            raise NVMLError_InvalidArgument()
        self._check_room(gpu, profile, place.start)
        return self._add_gi(gpu, profile, place.start)

    def nvmlDeviceCreateGpuInstance(self, handle: Any, profileId: int) -> FakeGpuInstance:
        """First fit: the lowest free placement, which is what makes mixed layouts fail."""
        self._enter("nvmlDeviceCreateGpuInstance", mutating=True)
        gpu = self._mig_gpu(handle)
        self._require_root(gpu)
        profile = self._profile_by_id(gpu, profileId)
        for start in profile.starts:
            try:
                self._check_room(gpu, profile, start)
            except NVMLError_InsufficientResources:
                continue
            return self._add_gi(gpu, profile, start)
        raise NVMLError_InsufficientResources()

    def nvmlDeviceGetGpuInstanceById(self, handle: Any, gpuInstanceId: int) -> FakeGpuInstance:
        self._enter("nvmlDeviceGetGpuInstanceById")
        gpu = self._mig_gpu(handle)
        self._require_root(gpu)  # NVML: "Requires privileged user."
        gi = gpu.gpu_instances.get(gpuInstanceId)
        if gi is None:
            raise NVMLError_NotFound()
        return gi

    def nvmlGpuInstanceGetInfo(self, gpuInstance: Any) -> c_nvmlGpuInstanceInfo_t:
        self._enter("nvmlGpuInstanceGetInfo")
        gi = self._live_gi(gpuInstance)
        return c_nvmlGpuInstanceInfo_t(
            device=gi.gpu,
            id=gi.id,
            profileId=gi.profile.id,
            placement=c_nvmlGpuInstancePlacement_t(start=gi.start, size=gi.profile.size),
        )

    def nvmlGpuInstanceDestroy(self, gpuInstance: Any) -> int:
        self._enter("nvmlGpuInstanceDestroy", mutating=True)
        gi = self._live_gi(gpuInstance)
        self._require_root(gi.gpu)
        if gi.compute_instances or any(p.gpuInstanceId == gi.id for p in gi.gpu.processes):
            raise NVMLError_InUse()
        gi.destroyed = True
        del gi.gpu.gpu_instances[gi.id]
        self.node.log.append(("destroy_gi", gi.gpu.index, gi.id))
        return NVML_SUCCESS

    # --- compute instances
    def nvmlGpuInstanceGetComputeInstanceProfileInfo(
        self, gpuInstance: Any, profile: int, engProfile: int, version: int = 2
    ) -> c_nvmlComputeInstanceProfileInfo_v2_t:
        self._enter("nvmlGpuInstanceGetComputeInstanceProfileInfo")
        gi = self._live_gi(gpuInstance)
        if not 0 <= profile < NVML_COMPUTE_INSTANCE_PROFILE_COUNT:
            raise NVMLError_InvalidArgument()
        if engProfile != NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED:
            raise NVMLError_InvalidArgument()
        slices = _CI_SLICES[profile]
        if profile in (0x5, 0x6, 0x7, 0x8) or slices > gi.profile.sliceCount:
            raise NVMLError_NotSupported()
        return c_nvmlComputeInstanceProfileInfo_v2_t(
            version=0x02000088,
            id=profile,
            sliceCount=slices,
            instanceCount=gi.profile.sliceCount // slices,
            multiprocessorCount=gi.profile.multiprocessorCount * slices // gi.profile.sliceCount,
            sharedCopyEngineCount=gi.profile.copyEngineCount,
            name=f"MIG {slices}c.{gi.profile.name}".encode(),
        )

    nvmlGpuInstanceGetComputeInstanceProfileInfoV = nvmlGpuInstanceGetComputeInstanceProfileInfo

    def nvmlGpuInstanceCreateComputeInstance(
        self, gpuInstance: Any, profileId: int
    ) -> FakeComputeInstance:
        self._enter("nvmlGpuInstanceCreateComputeInstance", mutating=True)
        gi = self._live_gi(gpuInstance)
        gpu = gi.gpu
        self._require_root(gpu)
        slices = _CI_SLICES.get(profileId)
        if slices is None or slices > gi.profile.sliceCount:
            raise NVMLError_InvalidArgument()
        used = sum(ci.slices for ci in gi.compute_instances.values())
        free_index = next((i for i, m in enumerate(gpu.mig_slots) if m is None), None)
        if used + slices > gi.profile.sliceCount or free_index is None:
            raise NVMLError_InsufficientResources()
        ci_id = next(i for i in range(8) if i not in gi.compute_instances)
        ci = FakeComputeInstance(gi=gi, id=ci_id, profile_id=profileId, slices=slices)
        self._serial += 1
        mig_uuid = uuid.uuid5(uuid.NAMESPACE_OID, f"{gpu.uuid}/mig/{self._serial}")
        ci.mig = FakeMigDevice(ci=ci, uuid=f"MIG-{mig_uuid}", index=free_index)
        gi.compute_instances[ci_id] = ci
        gpu.mig_slots[free_index] = ci.mig
        self.node.log.append(("create_ci", gpu.index, gi.id, profileId))
        return ci

    def nvmlGpuInstanceGetComputeInstanceById(
        self, gpuInstance: Any, computeInstanceId: int
    ) -> FakeComputeInstance:
        self._enter("nvmlGpuInstanceGetComputeInstanceById")
        gi = self._live_gi(gpuInstance)
        ci = gi.compute_instances.get(computeInstanceId)
        if ci is None:
            raise NVMLError_NotFound()
        return ci

    def nvmlComputeInstanceDestroy(self, computeInstance: Any) -> int:
        self._enter("nvmlComputeInstanceDestroy", mutating=True)
        if not isinstance(computeInstance, FakeComputeInstance) or computeInstance.destroyed:
            raise NVMLError_InvalidArgument()
        ci = computeInstance
        gpu = ci.gi.gpu
        self._require_root(gpu)
        if any(p.gpuInstanceId == ci.gi.id and p.computeInstanceId == ci.id for p in gpu.processes):
            raise NVMLError_InUse()
        ci.destroyed = True
        del ci.gi.compute_instances[ci.id]
        if ci.mig is not None:
            gpu.mig_slots[ci.mig.index] = None
        self.node.log.append(("destroy_ci", gpu.index, ci.gi.id, ci.id))
        return NVML_SUCCESS


_EXPORTED_PREFIXES = ("NVML_", "NVMLError", "c_nvml", "nvmlExceptionClass")


def make_fake_pynvml(node: FakeNode | None = None) -> types.ModuleType:
    """A module object with pynvml's names, bound to ``node`` (default: one H100, MIG off).

    ``module.node`` is the node and ``module.fake`` the FakeNvml, for assertions.
    """
    fake = FakeNvml(node if node is not None else FakeNode())
    module = types.ModuleType("pynvml", "fake pynvml (tests/fakes/fake_pynvml.py)")
    for name, value in globals().items():
        if name.startswith(_EXPORTED_PREFIXES):
            setattr(module, name, value)
    for name in dir(FakeNvml):
        if name.startswith("nvml"):
            setattr(module, name, getattr(fake, name))
    module.node = fake.node  # type: ignore[attr-defined]
    module.fake = fake  # type: ignore[attr-defined]
    return module


def make_fake_pynvml_without_driver() -> types.ModuleType:
    """``import pynvml`` works but ``nvmlInit`` raises LibraryNotFound: a machine with no GPU."""
    return make_fake_pynvml(FakeNode(gpus=[], driver_loaded=False))
