"""mig-kernel: isolated GPU slices (NVIDIA MIG) for notebook kernels, behind a local remoting
server. ``connect`` leases a slice from the node broker; ``Session.run`` runs functions on it."""

__version__ = "0.1.0"

from .client import Session, connect
from .remote import (
    ExecutorLost,
    Invocation,
    RemoteArray,
    RemoteError,
    RemoteObject,
)

__all__ = [
    "ExecutorLost",
    "Invocation",
    "RemoteArray",
    "RemoteError",
    "RemoteObject",
    "Session",
    "__version__",
    "connect",
]
