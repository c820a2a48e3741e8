"""mig-kernel: isolated GPU slices (NVIDIA MIG) for notebook kernels, behind a local remoting
server. ``connect`` leases a slice from the node broker."""

__version__ = "0.1.0"

from .client import Session, connect

__all__ = ["Session", "__version__", "connect"]
