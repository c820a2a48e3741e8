"""mig-kernel: isolated GPU slices (NVIDIA MIG) for notebook kernels, behind a local remoting
server. ``connect`` leases a slice from the node broker; ``Session.run`` runs functions on it.

The public names load on first use (PEP 562): a kernel imports this package at start, and
the client's imports (NumPy among them) would otherwise add to every kernel's start time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "Session": ".client",
    "attach": ".client",
    "connect": ".client",
    "current_session": ".current",
    "gpufunc": ".gpufunc",
    "ExecutorLost": ".remote",
    "Invocation": ".remote",
    "RemoteArray": ".remote",
    "RemoteError": ".remote",
    "RemoteObject": ".remote",
}

if TYPE_CHECKING:
    from .client import Session, attach, connect
    from .current import current_session
    from .gpufunc import gpufunc
    from .remote import ExecutorLost, Invocation, RemoteArray, RemoteError, RemoteObject


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """jupyter_server finds the extension (``jpserver_extensions: {"mig_kernel": true}``)
    here; it lives in ``mig_kernel_rest`` (the checkout's top-level ``extension/``). Imports
    nothing."""
    return [{"module": "mig_kernel_rest"}]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mig_kernel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [
    "ExecutorLost",
    "Invocation",
    "RemoteArray",
    "RemoteError",
    "RemoteObject",
    "Session",
    "__version__",
    "attach",
    "connect",
    "current_session",
    "gpufunc",
]
