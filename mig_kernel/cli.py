"""``mig-kernel``: the command line, as traitlets applications (config in mig_kernel_config.py
in the Jupyter config path, overridden by flags)."""

from __future__ import annotations

import copy
import json
import logging
import signal
import sys
from typing import Any

from jupyter_core.paths import jupyter_config_path
from traitlets import Bool, Enum, Int, Unicode
from traitlets.config import Application, catch_config_error

from . import __version__
from .broker.identity import LocalUserIdentity
from .broker.server import Broker, BrokerStartError
from .client import BrokerClient
from .slices import DEFAULT_SIM_LAYOUT, SliceError, make_inventory
from .wire.errors import MigKernelError


class BaseApp(Application):
    version = __version__
    config_file_name = Unicode("mig_kernel_config", help="Config file name (without .py/.json).")

    @catch_config_error
    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        if self.subapp is not None:
            return
        cli_config = copy.deepcopy(self.config)
        for directory in reversed(jupyter_config_path()):
            self.load_config_file(self.config_file_name, path=[directory])
        self.update_config(cli_config)

    def fail(self, message: str, code: int = 2) -> None:
        print(f"{self.name}: error: {message}", file=sys.stderr)
        self.exit(code)


class BrokerApp(BaseApp):
    name = "mig-kernel broker"
    description = "Run the node broker in the foreground (Ctrl-C or SIGTERM stops it cleanly)."
    classes = [Broker, LocalUserIdentity]
    backend = Enum(
        ["auto", "nvml", "sim"],
        "auto",
        help="Where slices come from: nvml (real GPUs), sim (simulated), auto (nvml if a GPU "
        "is found, else sim).",
    ).tag(config=True)
    sim_layout = Unicode(
        DEFAULT_SIM_LAYOUT,
        help="Simulated node: 'CARD:PROFILES', e.g. 'H100-80GB:7x1g.10gb' or "
        "'H100-80GB:3g.40gb,2g.20gb,1g.10gb,1g.10gb'; several GPUs separated by ';'.",
    ).tag(config=True)
    share = Int(
        1, help="On GPUs with MIG disabled, split each GPU into this many memory-capped slices."
    ).tag(config=True)
    aliases = {
        "backend": "BrokerApp.backend",
        "sim-layout": "BrokerApp.sim_layout",
        "share": "BrokerApp.share",
        "state-dir": "Broker.state_dir",
        "idle-timeout": "Broker.idle_timeout",
        "per-user-limit": "Broker.per_user_limit",
        "log-level": "Application.log_level",
    }

    def start(self) -> None:
        logging.getLogger("mig_kernel").setLevel(self.log_level)
        logging.getLogger("mig_kernel").addHandler(
            self.log.handlers[0] if self.log.handlers else logging.StreamHandler()
        )
        try:
            inventory = make_inventory(self.backend, sim_layout=self.sim_layout, share=self.share)
        except SliceError as exc:
            self.fail(str(exc))
            return
        broker = Broker(inventory, parent=self)
        try:
            broker.start()
        except BrokerStartError as exc:
            self.fail(str(exc))
            return
        signal.signal(signal.SIGTERM, lambda *_: broker.stop())
        signal.signal(signal.SIGINT, lambda *_: broker.stop())
        print(
            f"mig-kernel broker ready: {len(broker.slices)} slice(s), state in {broker.state_path}",
            flush=True,
        )
        try:
            broker.serve_forever()
        finally:
            inventory.close()


class ClientApp(BaseApp):
    """Base of the commands that talk to a running broker."""

    connection_file = Unicode(
        "", help="The broker's broker.json (default: $MIG_KERNEL_BROKER, then the state dir)."
    ).tag(config=True)
    aliases = {"broker": "ClientApp.connection_file"}

    def client(self) -> BrokerClient:
        return BrokerClient(self.connection_file or None)

    def run(self, action: Any) -> Any:
        try:
            with self.client() as client:
                return action(client)
        except MigKernelError as exc:
            self.fail(str(exc), code=1)


def format_status(status: dict[str, Any]) -> str:
    """The human table of ``mig-kernel status``."""
    rows = [("SLICE", "GPU", "PROFILE", "ISOLATION", "MEMORY (GiB)", "STATE", "HOLDER", "IDLE")]
    for s in status["slices"]:
        memory = f"{s['memory_used'] / 2**30:.1f}/{s['memory_total'] / 2**30:.1f}"
        idle = f"{s['idle_seconds']:.0f}s" if s.get("idle_seconds") is not None else "-"
        holder = (s["holder"] or "-") + (" (you)" if s.get("mine") else "")
        rows.append(
            (s["id"], str(s["gpu"]), s["profile"], s["isolation"], memory, s["state"], holder, idle)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append(f"queue: {len(status['queue'])} waiting")
    for q in status["queue"]:
        lines.append(
            f"  {q['position']}. {q['profile'] or q['memory'] or 'any'} "
            f"for {q['holder']}, waiting {q['waiting_seconds']:.0f}s"
        )
    return "\n".join(lines)


class StatusApp(ClientApp):
    name = "mig-kernel status"
    description = "Show the node's slices and queue."
    json = Bool(False, help="Print design.md's status JSON instead of a table.").tag(config=True)
    flags = {"json": ({"StatusApp": {"json": True}}, "Print JSON.")}

    def start(self) -> None:
        status = self.run(lambda c: c.status())
        print(json.dumps(status, indent=1) if self.json else format_status(status))


class MetricsApp(ClientApp):
    name = "mig-kernel metrics"
    description = "Print the broker's Prometheus metrics."

    def start(self) -> None:
        print(self.run(lambda c: c.metrics()), end="")


class SliceAdminApp(ClientApp):
    """``drain``/``undrain SLICE``: admin operations on one slice."""

    operation = ""

    def start(self) -> None:
        if len(self.extra_args) != 1:
            self.fail(f"usage: mig-kernel {self.operation} SLICE_ID")
        result = self.run(lambda c: c.request(self.operation, slice_id=self.extra_args[0]))
        print(json.dumps(result))


class DrainApp(SliceAdminApp):
    name = "mig-kernel drain"
    description = "Stop granting a slice (its current lease runs on). Admin only."
    operation = "drain"


class UndrainApp(SliceAdminApp):
    name = "mig-kernel undrain"
    description = "Offer a drained or broken slice again. Admin only."
    operation = "undrain"


class ApplyLayoutApp(ClientApp):
    name = "mig-kernel apply-layout"
    description = (
        "Replace the MIG instances of an idle GPU: apply-layout GPU 'PROFILES'. Admin only."
    )

    def start(self) -> None:
        if len(self.extra_args) != 2 or not self.extra_args[0].isdigit():
            self.fail("usage: mig-kernel apply-layout GPU_INDEX '3g.40gb,2g.20gb,1g.10gb,1g.10gb'")
        gpu, layout = int(self.extra_args[0]), self.extra_args[1]
        print(json.dumps(self.run(lambda c: c.apply_layout(gpu, layout)), indent=1))


class MigKernelApp(BaseApp):
    name = "mig-kernel"
    description = "Isolated GPU slices for notebook kernels."
    subcommands = {
        "broker": (BrokerApp, BrokerApp.description),
        "status": (StatusApp, StatusApp.description),
        "metrics": (MetricsApp, MetricsApp.description),
        "drain": (DrainApp, DrainApp.description),
        "undrain": (UndrainApp, UndrainApp.description),
        "apply-layout": (ApplyLayoutApp, ApplyLayoutApp.description),
    }

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(2)
        self.subapp.start()


def main(argv: list[str] | None = None) -> None:
    app = MigKernelApp.instance()
    app.initialize(argv)
    app.start()
