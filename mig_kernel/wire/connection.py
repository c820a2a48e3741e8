"""Where a broker is and how to reach it: the 0600 connection file, the 0700 runtime directory,
and binding ipc sockets so their files are 0600 from the first instant."""

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

CONNECTION_FILE = "broker.json"
ENV_BROKER = "MIG_KERNEL_BROKER"
ENV_STATE_DIR = "MIG_KERNEL_STATE_DIR"
IPC_PATH_MAX = 107  # sun_path limit on Linux, minus the terminating NUL


@dataclass(frozen=True)
class ConnectionInfo:
    """The content of ``broker.json``: enough to reach the broker and prove who you are."""

    endpoint: str  # ROUTER for requests
    watch_endpoint: str  # PUB stream of state changes
    key: str  # hex; signs the hello that opens a client session (single-user identity)
    pid: int
    state_dir: str
    user: str
    version: str

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
    """The connection file a client should read: explicit, ``$MIG_KERNEL_BROKER``, or the
    default state dir's ``broker.json``."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_BROKER):
        return Path(os.environ[ENV_BROKER])
    return default_state_dir() / CONNECTION_FILE


def write_connection_file(path: Path, info: ConnectionInfo) -> None:
    """Write atomically with mode 0600 (never readable by others, not even for an instant)."""
    fd, tmp = tempfile.mkstemp(prefix=".broker-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(info), f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_connection_file(path: str | os.PathLike[str] | None = None) -> ConnectionInfo:
    target = connection_file_path(path)
    try:
        data = json.loads(target.read_text())
        return ConnectionInfo(**{k: data[k] for k in ConnectionInfo.__dataclass_fields__})
    except FileNotFoundError:
        raise BrokerUnavailable(
            f"no broker connection file at {target}: start one with `mig-kernel broker`, or set "
            f"{ENV_BROKER} to its broker.json"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BrokerUnavailable(f"broker connection file {target} is unreadable: {exc}") from None


def private_dir(path: Path) -> Path:
    """Create (or check) a directory only its owner may enter: 0700 and owned by us.

    A directory that exists with another owner or looser mode is refused: someone else could
    have placed sockets in it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this user")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def runtime_dir_for(state_dir: Path) -> Path:
    """The socket directory of the broker owning ``state_dir``.

    Derived from the state dir (so a restarted broker and the executors it re-adopts meet at
    the same paths) and kept short (ipc paths are limited to 107 bytes)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    candidate = Path(base) / f"mig-kernel-{os.getuid()}-{digest}"
    if len(str(candidate)) > IPC_PATH_MAX - 24:
        candidate = Path("/tmp") / f"mig-kernel-{os.getuid()}-{digest}"
    return private_dir(candidate)


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


def bind_private(socket: zmq.Socket, endpoint: str) -> None:
    """Bind so that an ipc socket file is created 0600 (zmq creates it 0777 & ~umask)."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale file from a killed process; the directory is ours alone
        with _umask(0o177):
            socket.bind(endpoint)
    else:
        socket.bind(endpoint)
