"""The array runtime of a slice and its warm start.

A GPU slice runs CuPy, a sim slice NumPy; functions see either as ``xp``. Warm start does, before
the executor reports ready, everything a first call would otherwise pay for: import, context
creation, and compiling and running a tiny kernel (about 2.4 s on an H100 when cold).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass
class Runtime:
    name: str
    xp: ModuleType
    warm_seconds: float
    device: dict[str, Any] = field(default_factory=dict)

    def memory_used(self) -> int:
        """Bytes of device memory this executor holds (CuPy pool; 0 on sim until arrays exist)."""
        if self.name == "cupy":
            return int(self.xp.get_default_memory_pool().used_bytes())
        return 0


def _warm_numpy() -> tuple[ModuleType, dict[str, Any]]:
    import numpy

    probe = numpy.arange(1024, dtype=numpy.float32)
    if float((probe * 2).sum()) != 1047552.0:
        raise RuntimeError("numpy warm-up computed a wrong result")
    return numpy, {"name": "cpu (simulated slice)"}


def _warm_cupy(memory_limit: int | None) -> tuple[ModuleType, dict[str, Any]]:
    import cupy

    if memory_limit:
        cupy.get_default_memory_pool().set_limit(size=memory_limit)
    probe = cupy.arange(1024, dtype=cupy.float32)
    if float((probe * 2).sum()) != 1047552.0:  # compiles and runs a kernel, syncs
        raise RuntimeError("cupy warm-up computed a wrong result")
    props = cupy.cuda.runtime.getDeviceProperties(0)
    free, total = cupy.cuda.runtime.memGetInfo()
    return cupy, {
        "name": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "multiprocessors": props["multiProcessorCount"],
        "memory_total": int(total),
        "memory_free": int(free),
        "pool_limit": int(cupy.get_default_memory_pool().get_limit()),
    }


def warm_start(name: str, memory_limit: int | None = None) -> Runtime:
    start = time.perf_counter()
    if name == "numpy":
        xp, device = _warm_numpy()
    elif name == "cupy":
        xp, device = _warm_cupy(memory_limit)
    else:
        raise ValueError(f"unknown runtime {name!r}: expected 'numpy' or 'cupy'")
    return Runtime(name=name, xp=xp, warm_seconds=time.perf_counter() - start, device=device)
