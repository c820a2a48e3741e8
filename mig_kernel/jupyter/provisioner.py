"""``mig-provisioner``: a LocalProvisioner that leases the kernel's GPU slice.

It strips GPU access from the kernel process (the kernel reaches its slice only through the
executor), labels the lease with the kernel id so the kernel process (and the next one after a
restart) finds it, and releases it when the kernel shuts down for good. Heartbeats come from the
kernel process, so a kernel that dies loses its slice within the broker's heartbeat window
unless a restart takes it over first.

Nothing the broker says, and no failure to reach it, fails a kernel start (jupyter_server would
answer HTTP 500 and the user would see a dialog with a traceback): the kernel starts without a
slice and the reason, one line, travels in its environment to ``%gpu status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Enum, Float, Unicode

from ..client import BrokerClient, notebook_label
from ..current import ENV_IDLE_TIMEOUT, ENV_NO_SLICE_REASON, ENV_PROFILE, ENV_TAG
from ..wire.connection import ENV_BROKER
from ..wire.errors import LeaseEnded, LeaseNotFound, MigKernelError
from ..wire.reach import describe_failure

GPU_ENV_PREFIXES = ("NVIDIA_", "CUDA_MPS_", "ROCR_", "HIP_")  # device variables the kernel loses


def strip_gpu_env(env: dict[str, str]) -> dict[str, str]:
    """The kernel's environment without GPU access: no visible CUDA device, no NVIDIA device
    variables (container runtimes, MPS), so CUDA libraries in the kernel find no device."""
    cleaned = {k: v for k, v in env.items() if not k.startswith(GPU_ENV_PREFIXES)}
    cleaned["CUDA_VISIBLE_DEVICES"] = ""
    return cleaned


class MigProvisioner(LocalProvisioner):  # type: ignore[misc]
    profile = Unicode(
        None, allow_none=True, help="Slice profile to lease (None: the smallest free slice)."
    ).tag(config=True)
    idle_timeout = Float(
        None,
        allow_none=True,
        help="Seconds without GPU work after which the slice goes back to the pool (None: the "
        "broker's; never longer than the broker's).",
    ).tag(config=True)
    acquire = Enum(
        ["eager", "lazy"],
        "eager",
        help="eager: lease at kernel start; lazy: at the kernel's first GPU cell.",
    ).tag(config=True)
    broker = Unicode(
        None,
        allow_none=True,
        help="The broker's connection file (None: $MIG_KERNEL_BROKER or the default state dir).",
    ).tag(config=True)

    lease_id: str | None = None
    no_slice_reason: str | None = None  # why the last start got no slice (one line)

    @property
    def tag(self) -> str:
        return f"kernel:{self.kernel_id}"

    def _client(self) -> BrokerClient:
        return BrokerClient(self.broker, timeout=5.0)

    # -- launch ----------------------------------------------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        env = strip_gpu_env(kwargs.get("env") or dict(os.environ))
        env[ENV_TAG] = self.tag
        if self.profile:
            env[ENV_PROFILE] = self.profile
        if self.idle_timeout:
            env[ENV_IDLE_TIMEOUT] = repr(float(self.idle_timeout))
        if self.broker:
            env[ENV_BROKER] = self.broker
        kwargs["env"] = env
        env.pop(ENV_NO_SLICE_REASON, None)  # inherited from an earlier start, or a parent
        if self.acquire == "eager":
            await asyncio.to_thread(self._ensure_lease, notebook_label(env))
            if self.no_slice_reason:
                env[ENV_NO_SLICE_REASON] = self.no_slice_reason
        return kwargs

    def _ensure_lease(self, label: str | None = None) -> None:
        """Lease now unless this kernel holds one (a restart keeps it). Whatever stops it (no
        free slice, the user's quota used up, a profile the node lacks, a broker that refuses
        this user or cannot be reached) the kernel starts anyway: ``no_slice_reason`` says why,
        and the first GPU cell waits in the queue or shows the broker's answer in the cell.
        ``label`` is the kernel's notebook (jupyter_server's ``JPY_SESSION_NAME`` in the
        kernel's environment), which the broker names to the user when these slices hold back
        another request of theirs."""
        self.no_slice_reason = None
        try:
            with self._client() as client:
                held = client.leases(tag=self.tag)
                if held:
                    self.lease_id = held[0]["id"]
                    return
                lease = client.acquire(
                    self.profile,
                    wait=False,
                    idle_timeout=self.idle_timeout,
                    tag=self.tag,
                    label=label,
                )
                self.lease_id = lease["id"]
                self.log.info(
                    "mig-kernel: kernel %s leased %s (%s)",
                    self.kernel_id,
                    lease["slice"]["id"],
                    lease["slice"]["profile"],
                )
        except (MigKernelError, OSError) as exc:
            self.no_slice_reason = describe_failure(exc)
            self.log.warning(
                "mig-kernel: kernel %s starts without a slice: %s",
                self.kernel_id,
                self.no_slice_reason,
            )
        except Exception as exc:  # a bug here must not stop the kernel either
            self.no_slice_reason = f"internal error while leasing: {describe_failure(exc)}"
            self.log.exception("mig-kernel: kernel %s starts without a slice", self.kernel_id)

    # -- shutdown --------------------------------------------------------------------------
    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if not restart:
            await asyncio.to_thread(self._release)

    def _release(self) -> None:
        """Give back whatever this kernel holds (the kernel usually released it already)."""
        with contextlib.suppress(MigKernelError, OSError), self._client() as client:
            for lease in client.leases(tag=self.tag):
                with contextlib.suppress(LeaseEnded, LeaseNotFound):
                    client.release(lease["id"])
                    self.log.info("mig-kernel: released %s", lease["id"])
        self.lease_id = None

    # -- persistence across server restarts ------------------------------------------------
    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["mig_lease"] = {"id": self.lease_id, "tag": self.tag}
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.lease_id = (provisioner_info.get("mig_lease") or {}).get("id")
