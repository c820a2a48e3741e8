"""The kernel process of mig-kernel kernelspecs: ipykernel with the ``%%gpufunc`` extension
loaded, attached at start to the slice its provisioner leased.

A restart must not give the slice back (the provisioner keeps it for the next process), while a
plain shutdown must; only the kernel learns which one a shutdown request is, so it says so here.

The attach (which loads the client and NumPy and starts the lease's heartbeats) runs on a thread
once the kernel has answered its first kernel_info request, so it does not delay the kernel's
start; a GPU cell that comes first attaches by itself (the holder's lock orders the two). The
broker's heartbeat window (15 s by default) covers the gap.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp
from traitlets import List, Type, Unicode, default

from .. import __version__
from ..current import holder
from ..wire.errors import MigKernelError
from ..wire.reach import describe_failure

log = logging.getLogger("mig_kernel.kernel")
EXTENSION = "mig_kernel.jupyter.magics"
ATTACH_FALLBACK_SECONDS = 2.0  # attach anyway if no kernel_info request comes


def attach_slice(logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Take over the lease the provisioner acquired (eager kernels), so heartbeats start; with
    none (lazy kernels, or no free slice at start) the first GPU cell leases. A broker that
    refuses or cannot be reached is only logged: the holder keeps the reason for ``%gpu
    status``, and nothing may escape this thread (its traceback would land in a random cell)."""
    slice_holder = holder()
    try:
        session = slice_holder.attach_existing()
    except (MigKernelError, OSError) as exc:  # the holder has recorded why
        logger.warning("mig-kernel: no slice attached at start: %s", describe_failure(exc))
        return
    except Exception as exc:
        slice_holder.no_slice_reason = f"internal error while attaching: {describe_failure(exc)}"
        logger.exception("mig-kernel: no slice attached at start")
        return
    if session is not None:
        logger.info(
            "mig-kernel: attached to lease %s (%s on %s)",
            session.id,
            session.profile,
            session.slice["id"],
        )


class MigIPythonKernel(IPythonKernel):
    implementation = "mig-kernel"
    implementation_version = __version__
    _attach_lock = threading.Lock()
    _attach_started = False

    def start_attach(self) -> None:
        """Attach to the slice on a background thread, once per kernel process."""
        with self._attach_lock:
            if self._attach_started:
                return
            self._attach_started = True
        threading.Thread(
            target=attach_slice, args=(self.log,), name="mig-kernel attach", daemon=True
        ).start()

    async def kernel_info_request(self, stream: Any, ident: Any, parent: Any) -> None:
        await super().kernel_info_request(stream, ident, parent)
        self.start_attach()

    def do_shutdown(self, restart: bool) -> Any:
        """Restart: leave the lease to the next kernel process. Shutdown: release it."""
        try:
            if restart:
                holder().detach()
            else:
                holder().close()
        except Exception:  # the shutdown must go on; the broker reclaims by heartbeat anyway
            log.exception("mig-kernel: could not hand over the slice at shutdown")
        return super().do_shutdown(restart)


class MigKernelApp(IPKernelApp):
    name = "mig-kernel-kernel"
    kernel_class = Type(MigIPythonKernel, klass=IPythonKernel, help="The kernel class.").tag(
        config=True
    )
    default_extensions = List(Unicode(), help="Extensions loaded in every mig-kernel kernel.").tag(
        config=True
    )

    @default("default_extensions")
    def _default_extensions(self) -> list[str]:
        return ["storemagic", EXTENSION]

    def start(self) -> None:
        timer = threading.Timer(ATTACH_FALLBACK_SECONDS, self.kernel.start_attach)
        timer.daemon = True
        timer.start()
        super().start()


def main() -> None:
    MigKernelApp.launch_instance()


if __name__ == "__main__":
    main()
