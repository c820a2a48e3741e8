"""Slices of the node's real GPUs, read (and, for an admin, re-cut) through NVML.

Discovery is read-only and works unprivileged: a MIG-enabled GPU offers one slice per MIG
device; a GPU with MIG off offers itself whole, or ``share`` equal parts with a memory cap the
executor enforces (isolation ``process``: never claimed as ``mig``).

``apply_layout`` is the admin operation. Everything that can be decided without touching the
GPU is checked first (GPU exists, MIG on, the layout fits per the placement search, no process
runs), then instances are destroyed (compute instances before their GPU instance) and created
at the placements the search chose, so NVML never gets a chance to first-fit its way into a
dead end.

The NVML module is injected (``nvml=``) so tests run against tests/fakes/fake_pynvml.py; every
NVML name (functions, constants, error classes, structs) is read from that module.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import math
from typing import Any

from .model import (
    ApplyRefused,
    GpuInfo,
    Inventory,
    Isolation,
    LayoutError,
    SliceError,
    SliceInfo,
    UnknownProfile,
)
from .placement import PlacedInstance, format_items, parse_gpu_layout, place
from .profiles import CARDS, CardModel, card_for_nvml_name

log = logging.getLogger(__name__)

GiB = 2**30
# GPU instance ids are small (0..14 on A100/H100); the sweep finds GPU instances that have no
# compute instance (so no MIG device shows them), e.g. left by an interrupted layout change.
GI_ID_SWEEP = 32


def _text(value: str | bytes) -> str:
    """pynvml returns str from recent releases and bytes from older ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def whole_gpu_profile(total_bytes: int, share: int = 1) -> str:
    """Profile name of a process slice: ``gpu.80gb`` or ``gpu-1of4.20gb``.

    The size is total bytes in GiB, rounded: an H100 80GB HBM3 reports 81559 MiB (79.6 GiB),
    which rounds to the "80gb" its marketing name and MIG profile names use.
    """
    if share == 1:
        return f"gpu.{round(total_bytes / GiB)}gb"
    return f"gpu-1of{share}.{round(total_bytes / share / GiB)}gb"


class NvmlInventory(Inventory):
    """The node's GPUs as NVML sees them. ``nvmlInit`` errors propagate (``make_inventory``
    catches them to fall back to the simulated node)."""

    backend = "nvml"

    def __init__(self, share: int = 1, nvml: Any = None) -> None:
        if share < 1:
            raise SliceError(f"share must be 1 or more, not {share}")
        self._nvml = nvml if nvml is not None else importlib.import_module("pynvml")
        self._share = share
        self._nvml.nvmlInit()
        self._open = True
        self._mig_handles: dict[str, Any] = {}  # MIG uuid -> handle, for memory_used
        self._nvml_names: dict[int, dict[int, str]] = {}  # gpu index -> profile id -> name

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.warning("nvmlShutdown failed: %s", exc)

    # ------------------------------------------------------------------ discovery
    def gpus(self) -> list[GpuInfo]:
        try:
            return [self._gpu_info(index, h) for index, h in self._devices()]
        except self._nvml.NVMLError as exc:
            raise SliceError(f"NVML query failed: {exc}") from exc

    def slices(self) -> list[SliceInfo]:
        result: list[SliceInfo] = []
        handles: dict[str, Any] = {}
        try:
            for index, h in self._devices():
                gpu = self._gpu_info(index, h)
                if gpu.mig_enabled:
                    found = self._mig_slices(gpu, h)
                else:
                    found = [(info, None) for info in self._process_slices(gpu, h)]
                for info, handle in found:
                    result.append(info)
                    if handle is not None:
                        handles[info.uuid] = handle
        except self._nvml.NVMLError as exc:
            raise SliceError(f"NVML query failed: {exc}") from exc
        self._mig_handles = handles
        return result

    def memory_used(self, info: SliceInfo) -> int | None:
        """MIG devices report their own memory; process slices share the GPU's counter, so only
        their executor knows its use (None)."""
        if info.isolation is not Isolation.MIG:
            return None
        handle = self._mig_handles.get(info.uuid)
        if handle is None:
            self.slices()
            handle = self._mig_handles.get(info.uuid)
        if handle is None:
            return None
        try:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except self._nvml.NVMLError:
            self._mig_handles.pop(info.uuid, None)  # stale: the instance went away
            return None

    def _devices(self) -> list[tuple[int, Any]]:
        n = self._nvml
        return [(i, n.nvmlDeviceGetHandleByIndex(i)) for i in range(n.nvmlDeviceGetCount())]

    def _mig_enabled(self, h: Any) -> bool:
        n = self._nvml
        try:
            current, _pending = n.nvmlDeviceGetMigMode(h)
        except n.NVMLError_NotSupported:  # no MIG on this GPU
            return False
        return bool(current == n.NVML_DEVICE_MIG_ENABLE)

    def _gpu_info(self, index: int, h: Any) -> GpuInfo:
        n = self._nvml
        name = _text(n.nvmlDeviceGetName(h))
        card = card_for_nvml_name(name)
        return GpuInfo(
            index=index,
            uuid=_text(n.nvmlDeviceGetUUID(h)),
            name=name,
            card=card.name if card else None,
            memory_total=int(n.nvmlDeviceGetMemoryInfo(h).total),
            mig_enabled=self._mig_enabled(h),
            memory_slots=card.memory_slots if card else 0,
        )

    def _mig_devices(self, h: Any) -> list[Any]:
        n = self._nvml
        found = []
        for i in range(n.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                found.append(n.nvmlDeviceGetMigDeviceHandleByIndex(h, i))
            except n.NVMLError_NotFound:  # empty slot
                continue
        return found

    def _mig_slices(self, gpu: GpuInfo, h: Any) -> list[tuple[SliceInfo, Any]]:
        n = self._nvml
        card = CARDS.get(gpu.card) if gpu.card else None
        rows = []
        for position, mig in enumerate(self._mig_devices(h)):
            attrs = n.nvmlDeviceGetAttributes(mig)
            profile, start, size = self._instance_shape(gpu.index, card, h, mig, attrs)
            rows.append((start, position, profile, size, attrs, mig))
        # Order by placement so ids read left to right on the partition map; unknown
        # placements (unprivileged discovery) go last, in NVML's order.
        rows.sort(key=lambda r: (gpu.memory_slots if r[0] is None else r[0], r[1]))
        result = []
        for k, (start, _pos, profile, size, attrs, mig) in enumerate(rows):
            mig_uuid = _text(n.nvmlDeviceGetUUID(mig))
            info = SliceInfo(
                id=f"gpu{gpu.index}-s{k}",
                uuid=mig_uuid,
                gpu_index=gpu.index,
                gpu_uuid=gpu.uuid,
                profile=profile,
                isolation=Isolation.MIG,
                memory_total=int(n.nvmlDeviceGetMemoryInfo(mig).total),
                sms=int(attrs.multiprocessorCount),
                placement_start=start,
                placement_size=size,
                runtime="cupy",
                memory_limit=None,  # the hardware enforces the instance's memory
                env={"CUDA_VISIBLE_DEVICES": mig_uuid},
            )
            result.append((info, mig))
        return result

    def _instance_shape(
        self, index: int, card: CardModel | None, h: Any, mig: Any, attrs: Any
    ) -> tuple[str, int | None, int | None]:
        """(profile name, placement start, size) of a MIG device's GPU instance.

        Reading the GPU instance needs a privileged user; without it the profile is inferred
        from the device's attributes and the placement stays unknown.
        """
        n = self._nvml
        try:
            gi = n.nvmlDeviceGetGpuInstanceById(h, n.nvmlDeviceGetGpuInstanceId(mig))
            gi_info = n.nvmlGpuInstanceGetInfo(gi)
        except n.NVMLError_NoPermission:
            return self._name_from_attributes(card, attrs), None, None
        name = self._profile_name(index, card, h, int(gi_info.profileId))
        return name, int(gi_info.placement.start), int(gi_info.placement.size)

    def _profile_name(self, index: int, card: CardModel | None, h: Any, profile_id: int) -> str:
        if card is not None:
            try:
                return card.profile_by_id(profile_id).name
            except UnknownProfile:
                pass  # a profile our table lacks (newer driver): ask the driver below
        if index not in self._nvml_names:
            self._nvml_names[index] = self._read_profile_names(h)
        return self._nvml_names[index].get(profile_id, f"profile-{profile_id}")

    def _read_profile_names(self, h: Any) -> dict[int, str]:
        """Profile id -> name ("MIG 1g.10gb" -> "1g.10gb") from the driver's own table."""
        n = self._nvml
        names = {}
        for enum in range(n.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                info = n.nvmlDeviceGetGpuInstanceProfileInfo(h, enum)
            except (n.NVMLError_NotSupported, n.NVMLError_InvalidArgument):
                continue
            name = _text(info.name).strip()
            names[int(info.id)] = name.removeprefix("MIG ").strip()
        return names

    @staticmethod
    def _name_from_attributes(card: CardModel | None, attrs: Any) -> str:
        """Best guess without GPU-instance access: same compute slices, nearest memory size.

        A ``+me`` profile cannot be told from its plain twin this way; the plain name wins.
        """
        slices = int(attrs.gpuInstanceSliceCount)
        memory_mb = int(attrs.memorySizeMB)
        candidates = [p for p in card.profiles if p.compute_slices == slices] if card else []
        if candidates:
            best = min(
                candidates, key=lambda p: (abs(p.memory_mb - memory_mb), "+" in p.name, p.name)
            )
            return best.name
        return f"{slices}g.{math.ceil(memory_mb / 1024)}gb"

    def _process_slices(self, gpu: GpuInfo, h: Any) -> list[SliceInfo]:
        n = self._nvml
        try:
            sms: int | None = int(n.nvmlDeviceGetAttributes(h).multiprocessorCount)
        except n.NVMLError:
            sms = None
        share = self._share
        env = {"CUDA_VISIBLE_DEVICES": gpu.uuid}
        if share == 1:
            return [
                SliceInfo(
                    id=f"gpu{gpu.index}-s0",
                    uuid=gpu.uuid,
                    gpu_index=gpu.index,
                    gpu_uuid=gpu.uuid,
                    profile=whole_gpu_profile(gpu.memory_total),
                    isolation=Isolation.PROCESS,
                    memory_total=gpu.memory_total,
                    sms=sms,
                    runtime="cupy",
                    memory_limit=None,  # the whole card: nothing to cap
                    env=dict(env),
                )
            ]
        part = gpu.memory_total // share
        return [
            SliceInfo(
                id=f"gpu{gpu.index}-s{k}",
                uuid=f"{gpu.uuid}-share{k}",  # distinct per share; the GPU uuid goes in env
                gpu_index=gpu.index,
                gpu_uuid=gpu.uuid,
                profile=whole_gpu_profile(gpu.memory_total, share),
                isolation=Isolation.PROCESS,
                memory_total=part,
                sms=sms,  # shared with the other parts, not divided
                runtime="cupy",
                memory_limit=part,
                env=dict(env),
            )
            for k in range(share)
        ]

    # ------------------------------------------------------------------ admin: apply a layout
    def apply_layout(self, gpu_index: int, layout: str) -> list[SliceInfo]:
        n = self._nvml
        done: list[str] = []  # what has changed on the GPU, for the refusal message
        action = "checking the GPU"
        try:
            plan, h = self._plan(gpu_index, layout)
            action = "removing the existing instances"
            self._destroy_all(h, done)
            for inst in sorted(plan, key=lambda p: p.start):
                action = f"creating {inst.profile.name} at slot {inst.start}"
                self._create(h, inst)
                done.append(f"created {inst.profile.name}@{inst.start}")
        except n.NVMLError as exc:
            raise self._refusal(exc, gpu_index, action, done) from exc
        log.info("GPU %d now holds %s", gpu_index, format_items([p.profile.name for p in plan]))
        return self.slices()

    def _plan(self, gpu_index: int, layout: str) -> tuple[list[PlacedInstance], Any]:
        """Every check that needs no change to the GPU; raises ApplyRefused."""
        devices = self._devices()
        if not 0 <= gpu_index < len(devices):
            raise ApplyRefused(
                "no_such_gpu", f"no GPU {gpu_index}: this node has {len(devices)} GPU(s)"
            )
        h = devices[gpu_index][1]
        gpu = self._gpu_info(gpu_index, h)
        if not gpu.mig_enabled:
            raise ApplyRefused(
                "mig_disabled",
                f"GPU {gpu_index} ({gpu.name}) has MIG mode disabled; an admin enables it with "
                f"'nvidia-smi -i {gpu_index} -mig 1' (root, idle GPU)",
            )
        card = CARDS.get(gpu.card) if gpu.card else None
        if card is None:
            raise ApplyRefused(
                "not_supported",
                f"GPU {gpu_index} ({gpu.name}) has no card model for placement; "
                f"known cards: {', '.join(CARDS)}",
            )
        try:
            plan = place(card, parse_gpu_layout(layout, card))
        except (LayoutError, UnknownProfile) as exc:
            raise ApplyRefused("layout_does_not_fit", str(exc)) from exc
        pids = self._running_pids(h)
        if pids:
            raise ApplyRefused(
                "in_use",
                f"GPU {gpu_index} has running compute processes (pids "
                f"{', '.join(map(str, pids))}); stop them before changing its layout",
            )
        return plan, h

    def _running_pids(self, h: Any) -> list[int]:
        n = self._nvml
        pids: set[int] = set()
        for handle in [h, *self._mig_devices(h)]:
            try:
                procs = n.nvmlDeviceGetComputeRunningProcesses(handle)
            except (n.NVMLError_NotSupported, n.NVMLError_NoPermission):
                continue
            pids.update(int(p.pid) for p in procs)
        return sorted(pids)

    def _destroy_all(self, h: Any, done: list[str]) -> None:
        """Compute instances first (NVML refuses to destroy a GPU instance that has any), then
        every GPU instance, including ones without a compute instance."""
        n = self._nvml
        ids = [
            (n.nvmlDeviceGetGpuInstanceId(mig), n.nvmlDeviceGetComputeInstanceId(mig))
            for mig in self._mig_devices(h)
        ]
        for gi_id, ci_id in ids:
            gi = n.nvmlDeviceGetGpuInstanceById(h, gi_id)
            n.nvmlComputeInstanceDestroy(n.nvmlGpuInstanceGetComputeInstanceById(gi, ci_id))
            done.append(f"destroyed compute instance {ci_id} of GPU instance {gi_id}")
        for gi_id in range(GI_ID_SWEEP):
            try:
                gi = n.nvmlDeviceGetGpuInstanceById(h, gi_id)
            except (n.NVMLError_NotFound, n.NVMLError_InvalidArgument):
                continue
            n.nvmlGpuInstanceDestroy(gi)
            done.append(f"destroyed GPU instance {gi_id}")

    def _create(self, h: Any, inst: PlacedInstance) -> None:
        """One GPU instance at the planned placement, with one compute instance spanning it."""
        n = self._nvml
        info = n.nvmlDeviceGetGpuInstanceProfileInfo(h, inst.profile.nvml_enum)
        if int(info.id) != inst.profile.profile_id:
            log.warning(
                "driver reports profile id %s for %s, the card model says %s; using the driver's",
                info.id,
                inst.profile.name,
                inst.profile.profile_id,
            )
        placement = n.c_nvmlGpuInstancePlacement_t()
        placement.start = inst.start
        placement.size = inst.size
        # The binding hands this argument to C as is, and C expects a pointer.
        gi = n.nvmlDeviceCreateGpuInstanceWithPlacement(h, info.id, ctypes.byref(placement))
        try:
            ci_profile = getattr(
                n, f"NVML_COMPUTE_INSTANCE_PROFILE_{inst.profile.compute_slices}_SLICE"
            )
            ci_info = n.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                gi, ci_profile, n.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
            )
            n.nvmlGpuInstanceCreateComputeInstance(gi, ci_info.id)
        except n.NVMLError:
            try:  # a GPU instance without a compute instance is no slice: do not leave it
                n.nvmlGpuInstanceDestroy(gi)
            except n.NVMLError as exc:
                log.warning("could not remove the half-made GPU instance: %s", exc)
            raise

    def _refusal(
        self, exc: Exception, gpu_index: int, action: str, done: list[str]
    ) -> ApplyRefused:
        n = self._nvml
        hints = {
            n.NVML_ERROR_NO_PERMISSION: (
                "no_permission",
                "changing MIG instances needs root; run the layout change as root",
            ),
            n.NVML_ERROR_IN_USE: ("in_use", "a process is using the GPU or one of its instances"),
            n.NVML_ERROR_INSUFFICIENT_RESOURCES: (
                "insufficient_resources",
                "the GPU has no room for the instance (instances made by another tool?)",
            ),
            n.NVML_ERROR_NOT_SUPPORTED: (
                "not_supported",
                "the GPU or driver does not support this MIG operation",
            ),
        }
        code, hint = hints.get(getattr(exc, "value", None), ("nvml_error", "unexpected NVML error"))
        message = f"{action} on GPU {gpu_index} failed: NVML {exc}: {hint}"
        if done:
            message += f"; already done: {', '.join(done)} (run status to see the GPU now)"
        else:
            message += "; nothing on the GPU was changed"
        return ApplyRefused(code, message)
