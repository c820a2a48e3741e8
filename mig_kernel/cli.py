"""``mig-kernel``: the command line, as traitlets applications (config in mig_kernel_config.py
in the Jupyter config path, overridden by flags)."""

from __future__ import annotations

import copy
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_config_path, jupyter_path
from traitlets import Bool, Enum, Int, List, Unicode
from traitlets.config import Application, catch_config_error

from . import __version__
from .broker.identity import LocalUserIdentity, PeerCredentialIdentity
from .broker.places import BrokerStartError
from .broker.policy import LeasePolicy, limit_trait
from .broker.server import Broker
from .client import BrokerClient
from .jupyter import kernelspec
from .jupyter.lab import LabError, LabOptions, run_lab
from .slices import DEFAULT_SIM_LAYOUT, SliceError, make_inventory
from .wire.connection import SYSTEM_CONNECTION_FILE
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
    classes = [Broker, LeasePolicy, LocalUserIdentity, PeerCredentialIdentity]
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
        "runtime-dir": "Broker.runtime_dir",
        "spill-dir": "Broker.spill_dir",
        "lock-dir": "Broker.lock_dir",
        "idle-timeout": "Broker.idle_timeout",
        "per-user-limit": "LeasePolicy.per_user_limit",
        "admin-users": "LeasePolicy.admin_users",
        "admin-groups": "LeasePolicy.admin_groups",
        "executor-transport": "Broker.executor_transport",
        "log-level": "Application.log_level",
    }
    flags = {
        "multi-user": (
            {"Broker": {"multi_user": True}},
            "Serve every local user (run as root): identity from the socket (SO_PEERCRED), "
            "executors run as their lease holder, public broker.json in the runtime dir "
            "(default /run/mig-kernel), state in /var/lib/mig-kernel.",
        )
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
        # Before start: a stop asked for while the warm pool comes up still shuts down cleanly.
        signal.signal(signal.SIGTERM, lambda *_: broker.stop())
        signal.signal(signal.SIGINT, lambda *_: broker.stop())
        try:
            broker.start()
        except BrokerStartError as exc:
            self.fail(str(exc))
            return
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
        """``action(client)``; any failure to reach or be served by the broker is one line
        (``mig-kernel status: error: <reason>``) and exit status 1, never a traceback: it is
        what a user reads to learn that the broker is down or not theirs."""
        from .wire.reach import describe_failure

        try:
            with self.client() as client:
                return action(client)
        except (MigKernelError, OSError) as exc:
            self.fail(describe_failure(exc), code=1)


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


class InstallKernelspecApp(BaseApp):
    name = "mig-kernel install-kernelspec"
    description = (
        "Install the kernelspecs of the node's slices: mig-python3 (any slice) and "
        "mig-python3-<profile> for each profile (default: into this environment)."
    )
    user = Bool(False, help="Install into the user's Jupyter data dir.").tag(config=True)
    prefix = Unicode(
        "", help="Install into PREFIX/share/jupyter/kernels (default: sys.prefix, this env)."
    ).tag(config=True)
    profiles = List(
        Unicode(),
        help="Only these profiles (repeat, or separate with commas), plus mig-python3. "
        "Default: every profile the node offers.",
    ).tag(config=True)
    acquire = Enum(
        list(kernelspec.ACQUIRE_MODES),
        "eager",
        help="eager: lease the slice when the kernel starts; lazy: at the first GPU cell.",
    ).tag(config=True)
    idle_timeout = Int(
        None,
        allow_none=True,
        help="Seconds of GPU inactivity after which a kernel's slice goes back to the pool "
        "(default: the broker's).",
    ).tag(config=True)
    connection_file = Unicode(
        "",
        help="The broker whose profiles to install (default: $MIG_KERNEL_BROKER, then the "
        "state dir; with no broker answering, the node is discovered locally).",
    ).tag(config=True)
    multi_user = Bool(
        False,
        help="Kernelspecs for every user of a node with a multi-user broker: they name its "
        "public connection file (--broker, default /run/mig-kernel/broker.json), so kernels of "
        "any user reach it with no setting of their own. Install them where every user's "
        "Jupyter looks (this environment, or --prefix /usr/local).",
    ).tag(config=True)
    aliases = {
        "prefix": "InstallKernelspecApp.prefix",
        "profile": "InstallKernelspecApp.profiles",
        "acquire": "InstallKernelspecApp.acquire",
        "idle-timeout": "InstallKernelspecApp.idle_timeout",
        "broker": "InstallKernelspecApp.connection_file",
    }
    flags = {
        "user": ({"InstallKernelspecApp": {"user": True}}, "Install for this user only."),
        "sys-prefix": (
            {"InstallKernelspecApp": {"prefix": sys.prefix}},
            f"Install into this environment ({sys.prefix}); the default.",
        ),
        "multi-user": (
            {"InstallKernelspecApp": {"multi_user": True}},
            "Kernelspecs that name the node's multi-user broker (see --help-all).",
        ),
    }

    def start(self) -> None:
        if self.user and self.prefix:
            self.fail("give one of --user, --sys-prefix, --prefix")
        broker = self.connection_file or None
        if self.multi_user:
            broker = broker or str(SYSTEM_CONNECTION_FILE)
        offered = kernelspec.node_profiles(broker)
        wanted = [p.strip() for item in self.profiles for p in item.split(",") if p.strip()]
        chosen = offered
        if wanted:
            names = {profile.lower() for profile, _ in offered}
            unknown = [p for p in wanted if p.lower() not in names]
            if unknown:
                self.fail(
                    f"the node does not offer {', '.join(unknown)}; it offers "
                    f"{', '.join(p for p, _ in offered) or 'no slice'}",
                    code=1,
                )
            lowered = {p.lower() for p in wanted}
            chosen = [pair for pair in offered if pair[0].lower() in lowered]
        installed = kernelspec.install_kernelspecs(
            chosen,
            user=self.user,
            prefix=self.prefix or None,
            acquire=self.acquire,
            idle_timeout=self.idle_timeout,
            any_isolations=[isolation for _, isolation in offered],
            prune=not wanted,
            broker=broker if self.multi_user else None,
        )
        for name, path in installed:
            spec = json.loads((Path(path) / "kernel.json").read_text())
            print(f"{name}\t{spec['display_name']}\t{path}")
        kernels_dir = Path(installed[0][1]).parent
        if str(kernels_dir) not in jupyter_path("kernels"):
            print(
                f"note: {kernels_dir} is not on Jupyter's kernel path; add "
                f"{kernels_dir.parent} to JUPYTER_PATH",
                file=sys.stderr,
            )


class LabApp(BaseApp):
    name = "mig-kernel lab"
    description = (
        "The main job: the node broker (unless one already runs on the state dir) and "
        "JupyterLab with the mig-kernel kernelspecs and the demos. Ctrl-C stops both and "
        "releases every slice. Arguments after -- go to JupyterLab."
    )
    backend = Enum(
        ["auto", "nvml", "sim"],
        "auto",
        help="Where the started broker's slices come from: nvml, sim, or auto (nvml if a GPU "
        "is found, else sim).",
    ).tag(config=True)
    sim_layout = Unicode(
        DEFAULT_SIM_LAYOUT, help="The simulated node of a started broker (see broker --help)."
    ).tag(config=True)
    share = Int(1, help="A started broker splits each GPU without MIG into N slices.").tag(
        config=True
    )
    per_user_limit = limit_trait(
        "all",
        help="Slices you may hold at once on a broker this command starts: 'all' (the default: "
        "one person at the machine, one slice per notebook, as many as the node has) or a "
        "number; a notebook beyond it waits in the queue, told which of your notebooks to "
        "release. A broker already running keeps its own limit (LeasePolicy.per_user_limit).",
    ).tag(config=True)
    state_dir = Unicode(
        "",
        help="The broker's state dir (default: $MIG_KERNEL_STATE_DIR, else "
        "$XDG_STATE_HOME/mig-kernel). A broker already answering there is used and left running.",
    ).tag(config=True)
    port = Int(0, help="JupyterLab's port (0: Jupyter's default, 8888 or the next free).").tag(
        config=True
    )
    open_browser = Bool(True, help="Open JupyterLab in a browser.").tag(config=True)
    root_dir = Unicode(
        "",
        help="JupyterLab's root folder (default: ~/mig-kernel-demos, a copy of the demos that "
        "JupyterLab may change; the checkout or the package stays as it is).",
    ).tag(config=True)
    kernelspec_prefix = Unicode(
        "",
        help="Install the kernelspecs into PREFIX/share/jupyter/kernels (added to JupyterLab's "
        "JUPYTER_PATH) instead of this environment's sys.prefix.",
    ).tag(config=True)
    aliases = {
        "backend": "LabApp.backend",
        "sim-layout": "LabApp.sim_layout",
        "share": "LabApp.share",
        "per-user-limit": "LabApp.per_user_limit",
        "state-dir": "LabApp.state_dir",
        "port": "LabApp.port",
        "root-dir": "LabApp.root_dir",
        "kernelspec-prefix": "LabApp.kernelspec_prefix",
    }
    flags = {"no-browser": ({"LabApp": {"open_browser": False}}, "Do not open a browser.")}

    def start(self) -> None:
        options = LabOptions(
            backend=self.backend,
            sim_layout=self.sim_layout,
            share=self.share,
            per_user_limit=self.per_user_limit,
            state_dir=self.state_dir,
            port=self.port,
            open_browser=self.open_browser,
            root_dir=self.root_dir,
            kernelspec_prefix=self.kernelspec_prefix,
            extra_args=list(self.extra_args),
        )
        try:
            code = run_lab(options, Path(__file__).resolve().parent)
        except LabError as exc:
            self.fail(str(exc), code=exc.code)
            return
        self.exit(code)


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
        "install-kernelspec": (InstallKernelspecApp, InstallKernelspecApp.description),
        "lab": (LabApp, LabApp.description),
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
