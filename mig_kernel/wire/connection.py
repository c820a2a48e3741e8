"""Where a broker is and how to reach it: the connection file (0600 with the hello key for a
single-user broker; public, 0644 and without secrets, for a multi-user one), the runtime
directory of its sockets, and binding ipc sockets with their mode set from the first instant."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq

from .errors import BrokerUnavailable
from .paths import private_dir

CONNECTION_FILE = "broker.json"
ENV_BROKER = "MIG_KERNEL_BROKER"
ENV_STATE_DIR = "MIG_KERNEL_STATE_DIR"
IPC_PATH_MAX = 107  # sun_path limit on Linux, minus the terminating NUL
# The multi-user broker's places (``mig-kernel broker --multi-user``): its public connection
# file is the last place a client looks when it was told of no other.
SYSTEM_STATE_DIR = Path("/var/lib/mig-kernel")
SYSTEM_RUNTIME_DIR = Path("/run/mig-kernel")
SYSTEM_CONNECTION_FILE = SYSTEM_RUNTIME_DIR / CONNECTION_FILE
AUTH_KEY = "key"  # the hello is signed with the key in the 0600 connection file
AUTH_PEERCRED = "peercred"  # the broker reads who connects from the socket (SO_PEERCRED)


@dataclass(frozen=True)
class ConnectionInfo:
    """The content of ``broker.json``: enough to reach the broker and prove who you are."""

    endpoint: str  # ROUTER for requests
    watch_endpoint: str  # PUB stream of state changes
    key: str  # hex; signs the hello that opens a client session ("" where auth is peercred)
    pid: int
    state_dir: str
    user: str
    version: str
    auth: str = AUTH_KEY  # how the broker knows who a client is: AUTH_KEY or AUTH_PEERCRED

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key)


def default_state_dir() -> Path:
    """``$MIG_KERNEL_STATE_DIR``, else ``$XDG_STATE_HOME/mig-kernel`` (~/.local/state)."""
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "mig-kernel"


def connection_file_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The connection file a client should read: explicit, ``$MIG_KERNEL_BROKER``, the
    default state dir's ``broker.json``, and where that does not exist, the node's multi-user
    broker (``/run/mig-kernel/broker.json``) if one runs: a user on a shared node needs no
    setting to find it."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_BROKER):
        return Path(os.environ[ENV_BROKER])
    own = default_state_dir() / CONNECTION_FILE
    if not own.exists() and SYSTEM_CONNECTION_FILE.exists():
        return SYSTEM_CONNECTION_FILE
    return own


def write_connection_file(path: Path, info: ConnectionInfo, mode: int = 0o600) -> None:
    """Write atomically with ``mode`` set before any content is written: 0600 when it holds
    the hello key (never readable by others, not even for an instant), 0644 for the public
    file of a multi-user broker."""
    fd, tmp = tempfile.mkstemp(prefix=".broker-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(info), f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_connection_file(path: str | os.PathLike[str] | None = None) -> ConnectionInfo:
    """The broker's connection file. Every way of failing to read it is a BrokerUnavailable
    whose one line says what to do: it is what a kernel start, ``%gpu status`` and ``mig-kernel
    status`` show the user. Keys this version does not know are ignored, and keys with a
    default may be missing, so clients and brokers of neighbouring versions understand each
    other."""
    import pwd
    from dataclasses import MISSING

    target = connection_file_path(path)
    try:
        data = json.loads(target.read_text())
    except FileNotFoundError:
        raise BrokerUnavailable(
            f"no broker connection file at {target}: start one with `mig-kernel broker`, or set "
            f"{ENV_BROKER} to its broker.json"
        ) from None
    except PermissionError:
        owner = ""
        with contextlib.suppress(OSError):
            st = target.stat()
            try:
                who = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                who = f"uid {st.st_uid}"
            owner = f" (owner {who}, mode {stat.S_IMODE(st.st_mode):04o})"
        raise BrokerUnavailable(
            f"permission denied reading {target}{owner}: that broker serves another user; ask "
            f"your administrator for the multi-user broker ({ENV_BROKER}="
            f"{SYSTEM_CONNECTION_FILE}) or start your own with `mig-kernel broker`"
        ) from None
    except OSError as exc:
        raise BrokerUnavailable(
            f"cannot read the broker connection file {target}: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise BrokerUnavailable(f"broker connection file {target} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise BrokerUnavailable(f"broker connection file {target} is unreadable: not an object")
    values = {}
    for name, spec in ConnectionInfo.__dataclass_fields__.items():
        if name in data:
            values[name] = data[name]
        elif spec.default is MISSING:
            raise BrokerUnavailable(
                f"broker connection file {target} is unreadable: it has no {name!r}"
            )
    return ConnectionInfo(**values)


def runtime_dir_for(state_dir: Path) -> Path | None:
    """The socket directory of a single-user broker owning ``state_dir``, or None when no
    fixed place fits (the broker then makes an unpredictable one and remembers it).

    Derived from the state dir, so a restarted broker and the executors it re-adopts meet at
    the same paths, and short (ipc paths are limited to 107 bytes): inside
    ``$XDG_RUNTIME_DIR`` when that is ours and private, else ``<state_dir>/run``. Never a
    predictable name in a world-writable directory such as /tmp: anyone could create it first
    or plant a symlink there."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    candidates = []
    if xdg and os.path.isabs(xdg) and _private_to_us(Path(xdg)):
        candidates.append(Path(xdg) / f"mig-kernel-{digest}")
    candidates.append(state_dir / "run")
    for candidate in candidates:
        if len(str(candidate)) <= IPC_PATH_MAX - 24:  # room for "/E-<12 hex>.sock"
            return private_dir(candidate)
    return None


def new_runtime_dir() -> Path:
    """A fresh socket directory with an unpredictable name in the temp dir (0700, ours)."""
    return Path(tempfile.mkdtemp(prefix="mig-kernel-", dir="/tmp"))


def usable_runtime_dir(path: str) -> bool:
    """Whether a remembered socket directory is still ours, private and short enough."""
    candidate = Path(path)
    return len(path) <= IPC_PATH_MAX - 24 and _private_to_us(candidate)


def _private_to_us(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    loose = stat.S_IMODE(st.st_mode) & 0o077
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not loose


def ipc_endpoint(directory: Path, name: str) -> str:
    path = str(directory / name)
    if len(path) > IPC_PATH_MAX:
        raise ValueError(f"ipc path {path!r} is longer than {IPC_PATH_MAX} bytes")
    return f"ipc://{path}"


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def bind_private(socket: zmq.Socket, endpoint: str, mode: int = 0o600) -> None:
    """Bind so that an ipc socket file has ``mode`` from the first instant (zmq creates it
    0777 & ~umask): 0600 for a socket only its owner may use, 0666 for a multi-user broker's,
    whose peers are identified by the kernel (SO_PEERCRED) rather than by file permissions."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale file from a killed process; the directory is ours alone
        with _umask(0o777 & ~mode):
            socket.bind(endpoint)
    else:
        socket.bind(endpoint)
