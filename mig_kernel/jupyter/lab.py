"""``mig-kernel lab``: the node broker and JupyterLab as one command that also stops as one.

Order matters both ways. Up: the broker answers before the kernelspecs are written (they name
its profiles) and before JupyterLab starts (kernels lease from it at once). Down: JupyterLab
stops first, so jupyter_server shuts its kernels down and their provisioner releases their
slices while the broker still listens; then the broker, which ends any lease left and stops
every executor. A broker that was already running belongs to someone else and is left running.

Both children run in their own session: Ctrl-C in the terminal reaches only this process,
which stops them in that order (JupyterLab would otherwise ask "Shutdown this Jupyter server?"
and the broker would race it). On Linux each child also gets SIGTERM if this process dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ..client import BrokerClient
from ..wire.connection import CONNECTION_FILE, ENV_BROKER, default_state_dir, private_dir
from ..wire.errors import MigKernelError
from .kernelspec import install_kernelspecs, node_profiles

STOP_TIMEOUT = 30.0  # seconds each child gets to stop after SIGTERM before SIGKILL
START_TIMEOUT = 60.0  # seconds the broker gets to answer status
DEMOS_COPY = "mig-kernel-demos"  # in the home directory: where JupyterLab opens by default
DEMOS_MANIFEST = ".mig-kernel-demos.json"  # what was copied: tells untouched copies from edited
DEMO_SUFFIXES = (".ipynb", ".md")
QUICKSTART = "quickstart.ipynb"
LABEXTENSION = "@mig-kernel/labextension"  # the npm name of labextension/
SERVER_EXTENSION = "mig_kernel"  # jpserver_extensions name (extension/mig_kernel_rest/)
_PR_SET_PDEATHSIG = 1


def say(message: str) -> None:
    """One line on stderr per step, so the terminal tells what is up and what is stopping."""
    print(f"mig-kernel lab: {message}", file=sys.stderr, flush=True)


class LabError(Exception):
    """``mig-kernel lab`` cannot start; ``code`` is the exit status to end with."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _StopRequested(BaseException):
    """Raised by the SIGINT/SIGTERM handler to leave whatever the main thread waits on.

    A BaseException so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class LabOptions:
    """What ``mig-kernel lab`` was asked for (the traitlets of cli.LabApp)."""

    backend: str = "auto"
    sim_layout: str = ""
    share: int = 1
    per_user_limit: int | str = "all"  # slices one user may hold: N, or "all" the node has
    state_dir: str = ""
    port: int = 0
    open_browser: bool = True
    root_dir: str = ""
    kernelspec_prefix: str = ""
    extra_args: list[str] = field(default_factory=list)


@dataclass
class Broker:
    """The broker JupyterLab's kernels use; ``process`` is None for one we did not start."""

    connection_file: Path
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


# ------------------------------------------------------------------------------- processes
def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the lab process dies, even by SIGKILL,
    so neither JupyterLab nor the broker outlives it unnoticed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """A child in its own session that receives SIGTERM when this process dies (Linux)."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=preexec, **kwargs)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def exit_status(code: int) -> int:
    """A shell's exit status for a Popen return code (signal N -> 128 + N)."""
    return 128 - code if code < 0 else code


def stop_child(proc: subprocess.Popen[bytes], name: str, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns the return code."""
    if proc.poll() is None:
        say(f"stopping {name} (pid {proc.pid}): SIGTERM, waiting up to {timeout:g} s")
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop within {timeout:g} s: SIGKILL")
            proc.kill()
            proc.wait()
        say(f"{name} stopped ({describe_exit(proc.returncode)})")
    return proc.returncode


class StopSignals:
    """SIGINT and SIGTERM of the lab process, while inside ``with``.

    The first one raises _StopRequested in the main thread, which leaves whatever it waits on
    (the broker's start, JupyterLab). It raises only once: from then on, and once ``stopping``
    is called, a signal runs ``then`` instead: kill JupyterLab while it is being stopped (a
    second Ctrl-C means "now"), nothing while the broker stops (that must finish: it ends the
    leases and stops the executors). Never raising during the stop leaves no step skipped.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.raising = True
        self.then: Callable[[], object] = lambda: None
        self._previous: dict[int, Any] = {}

    def stopping(self, then: Callable[[], object] | None = None) -> None:
        self.raising = False
        self.then = then or (lambda: None)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.raising:
            self.raising = False
            raise _StopRequested(signum)
        self.then()  # no printing here: the main thread may be inside a print

    def __enter__(self) -> StopSignals:
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------- broker
def broker_answers(connection_file: Path, timeout: float = 2.0) -> bool:
    """Whether a broker answers a hello at this connection file."""
    if not connection_file.exists():
        return False
    try:
        with BrokerClient(connection_file, timeout=timeout):
            return True
    except MigKernelError:
        return False


def _log_tail(path: Path, start: int, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace").strip()


def start_broker(
    state_dir: Path, options: LabOptions, on_spawn: Callable[[Broker], None]
) -> Broker:
    """Start ``mig-kernel broker`` on ``state_dir`` and wait until it answers status.

    ``on_spawn`` gets the Broker as soon as the process exists, so a stop signal during the
    wait still stops it. Its output goes to ``<state_dir>/broker.log``."""
    private_dir(state_dir)
    connection_file = state_dir / CONNECTION_FILE
    with contextlib.suppress(FileNotFoundError):
        connection_file.unlink()  # no broker answers it: left by a killed one
    log_path = state_dir / "broker.log"
    argv = [
        sys.executable,
        "-m",
        "mig_kernel",
        "broker",
        "--backend",
        options.backend,
        "--state-dir",
        str(state_dir),
        "--share",
        str(options.share),
        "--per-user-limit",
        str(options.per_user_limit),
    ]
    if options.sim_layout:
        argv += ["--sim-layout", options.sim_layout]
    with open(log_path, "ab") as log:
        offset = log.tell()
        proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    broker = Broker(connection_file, proc, log_path)
    on_spawn(broker)
    say(f"starting the broker (pid {proc.pid}, backend {options.backend}; log {log_path})")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            tail = _log_tail(log_path, offset)
            raise LabError(
                f"the broker exited with {describe_exit(proc.returncode)}:\n{tail}",
                code=exit_status(proc.returncode) or 1,
            )
        if connection_file.exists():
            try:
                with BrokerClient(connection_file, timeout=1.0) as client:
                    slices = client.status()["slices"]
                break
            except MigKernelError:
                pass  # written but not serving yet
        if time.monotonic() > deadline:
            raise LabError(
                f"the broker did not answer within {START_TIMEOUT:g} s:\n"
                f"{_log_tail(log_path, offset)}"
            )
        time.sleep(0.1)
    say(f"broker ready: {len(slices)} slice(s); {ENV_BROKER}={connection_file}")
    if options.per_user_limit == "all":
        say(
            f"you may hold all {len(slices)} slice(s) at once, one per notebook (one person "
            "at this machine; --per-user-limit N sets a limit)"
        )
    else:
        say(
            f"you may hold {options.per_user_limit} of the {len(slices)} slice(s) at once; a "
            "notebook beyond that waits in the queue until one of yours is released"
        )
    return broker


# ------------------------------------------------------------------------------- jupyterlab
def demos_root(
    package_dir: Path, home: Path, display_names: dict[str, str] | None = None
) -> Path | None:
    """Where JupyterLab opens: ``~/mig-kernel-demos``, a copy of the demos (the checkout's
    ``demos/``, else those packaged in the wheel), or None when there are none.

    A copy and never the originals: JupyterLab autosaves outputs into the notebooks it runs,
    writes ``.ipynb_checkpoints/``, puts new notebooks in its root, and a checkout (or an
    installed package) must stay as it is. Each demo is copied when the copy lacks it, or
    replaced when the copy is still what was copied last time (the demos changed, the user
    did not touch it); a copy the user changed is kept. A notebook's kernelspec display name
    is set to the installed one (``display_names``: kernel name -> display name), so opening
    it changes nothing in it."""
    source = package_dir.parent / "demos"
    if not source.is_dir():
        source = package_dir / "demos"
    if not source.is_dir():
        return None
    copy = home / DEMOS_COPY
    copy.mkdir(exist_ok=True)
    manifest_path = copy / DEMOS_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    copied, kept = [], []
    for demo in sorted(source.iterdir()):
        if demo.suffix not in DEMO_SUFFIXES or not demo.is_file():
            continue
        content = _demo_content(demo, display_names or {})
        target = copy / demo.name
        digest = hashlib.sha256(content).hexdigest()
        if target.exists():
            current = hashlib.sha256(target.read_bytes()).hexdigest()
            if current == digest:
                manifest[demo.name] = digest
                continue
            if current != manifest.get(demo.name):
                kept.append(demo.name)  # the user's own version
                continue
        target.write_bytes(content)
        manifest[demo.name] = digest
        copied.append(demo.name)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    if copied:
        say(f"copied {', '.join(copied)} to {copy}")
    if kept:
        say(f"kept your edited {', '.join(kept)} in {copy} (delete one to get the current demo)")
    return copy


def _demo_content(demo: Path, display_names: dict[str, str]) -> bytes:
    """A demo file as it goes into the copy: a notebook with the installed display name."""
    data = demo.read_bytes()
    if demo.suffix != ".ipynb":
        return data
    try:
        notebook = json.loads(data)
        spec = notebook["metadata"]["kernelspec"]
        display = display_names.get(spec["name"])
    except (ValueError, KeyError, TypeError):
        return data
    if display is None or spec.get("display_name") == display:
        return data
    spec["display_name"] = display
    return (json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def installed_display_names(installed: list[tuple[str, str]]) -> dict[str, str]:
    """kernel name -> display name of the kernelspecs just installed (name, folder)."""
    names = {}
    for name, folder in installed:
        with contextlib.suppress(OSError, ValueError, KeyError):
            names[name] = json.loads((Path(folder) / "kernel.json").read_text())["display_name"]
    return names


def labextension_path(package_dir: Path, links: Path) -> Path | None:
    """A folder for JupyterLab's extension search path holding the checkout's own build of
    the extension, or None when there is none (an installed wheel: JupyterLab finds the
    extension in ``share/jupyter/labextensions`` of the environment).

    In a checkout (editable install) the build sits in ``mig_kernel/labextension/``, but
    JupyterLab looks for ``<folder>/@mig-kernel/labextension/package.json``: so ``links``
    gets that symlink to the build. Put first on the path, this live build wins over the copy
    an editable install also places in the environment (which a rebuild does not update).
    """
    built = package_dir / "labextension"
    if not (built / "package.json").is_file():
        return None
    link = links / LABEXTENSION
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(built.resolve(), target_is_directory=True)
    return links


def jupyterlab_argv(
    root: Path, options: LabOptions, labextensions: Path | None = None
) -> list[str]:
    argv = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}"]
    # The server extension (REST under /mig/api, which the JupyterLab extension reads) is
    # enabled here too, not only by the config file an install puts in etc/jupyter: that
    # file is missing where the package is only on the path (PYTHONPATH, a copied checkout).
    # Servers merge config-file extensions into this value, so JupyterLab's own stay on.
    argv.append(f"--ServerApp.jpserver_extensions={SERVER_EXTENSION}=True")
    if labextensions is not None:
        argv.append(f"--LabApp.extra_labextensions_path={labextensions}")
    if (root / QUICKSTART).is_file():
        argv.append(f"--LabApp.default_url=/lab/tree/{QUICKSTART}")
    if not options.open_browser:
        argv.append("--no-browser")
    if options.port:
        argv.append(f"--ServerApp.port={options.port}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Containers and CI run as root; the user chose that, and `make run` must start there.
        argv.append("--allow-root")
    return [*argv, *options.extra_args]


def jupyterlab_env(connection_file: Path, kernelspec_prefix: str) -> dict[str, str]:
    """The environment of JupyterLab and so of its kernels: where the broker is, and the
    kernelspec prefix on JUPYTER_PATH when it is not this environment's own."""
    env = dict(os.environ)
    env[ENV_BROKER] = str(connection_file)
    if kernelspec_prefix and Path(kernelspec_prefix).resolve() != Path(sys.prefix).resolve():
        data = str(Path(kernelspec_prefix).resolve() / "share" / "jupyter")
        env["JUPYTER_PATH"] = os.pathsep.join(p for p in (data, env.get("JUPYTER_PATH")) if p)
    return env


# ------------------------------------------------------------------------------------- main
def run_lab(options: LabOptions, package_dir: Path) -> int:
    """Run until JupyterLab exits or SIGINT/SIGTERM; returns the exit status (JupyterLab's).

    Raises LabError when the broker cannot start (after stopping whatever was started)."""
    state_dir = Path(options.state_dir or default_state_dir()).expanduser().absolute()
    connection_file = state_dir / CONNECTION_FILE
    broker: Broker | None = None
    lab: subprocess.Popen[bytes] | None = None
    code = 0
    links = tempfile.TemporaryDirectory(prefix="mig-kernel-lab-")

    def keep(started: Broker) -> None:
        nonlocal broker
        broker = started

    with StopSignals() as signals:
        try:
            if broker_answers(connection_file):
                broker = Broker(connection_file)
                say(
                    f"using the broker already running at {connection_file} (left running; "
                    "its own per-user limit applies, not --per-user-limit)"
                )
            else:
                start_broker(state_dir, options, keep)
            profiles = node_profiles(connection_file)
            prefix = options.kernelspec_prefix or sys.prefix
            installed = install_kernelspecs(profiles, prefix=prefix, prune=True)
            say(
                f"installed {len(installed)} kernelspec(s) in "
                f"{Path(installed[0][1]).parent}: {', '.join(n for n, _ in installed)}"
            )
            root = Path(options.root_dir).expanduser() if options.root_dir else None
            root = root or demos_root(package_dir, Path.home(), installed_display_names(installed))
            root = root or Path.cwd()
            extensions = labextension_path(package_dir, Path(links.name))
            if extensions is not None:
                say(f"JupyterLab extension: the checkout's build in {package_dir / 'labextension'}")
            argv = jupyterlab_argv(root.absolute(), options, extensions)
            lab = spawn(argv, env=jupyterlab_env(connection_file, options.kernelspec_prefix))
            own = argv[1 : len(argv) - len(options.extra_args)]  # the extras may hold a token
            say(f"starting JupyterLab (pid {lab.pid}): {' '.join(own)}")
            code = lab.wait()
            say(f"JupyterLab exited ({describe_exit(code)})")
        except _StopRequested as stop:
            say(f"{signal.Signals(stop.signum).name}: stopping")
        finally:
            signals.stopping(then=lab.kill if lab is not None else None)
            if lab is not None:
                code = stop_child(lab, "JupyterLab")
            signals.stopping()
            if broker is not None and broker.process is not None:
                stop_child(broker.process, "the broker")
            links.cleanup()
    return exit_status(code)
