"""A lease holder in a process of its own, for tests that SIGKILL it: it leases a slice, leaves
an array on it and one in its arena, prints what the test needs (one JSON line), then waits.

``python -m tests.support.holder BROKER_JSON`` (from the repository root).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import mig_kernel


def main() -> None:
    session = mig_kernel.connect(broker=sys.argv[1])
    kept = session.run(lambda: xp.arange(10) * 2)  # noqa: F821 (xp: the slice's array module)
    total = session.run(lambda a: float(a.sum()), np.ones(4096))  # through the arena
    print(
        json.dumps(
            {
                "lease": session.id,
                "executor_pid": session.ping()["pid"],
                "pid": os.getpid(),
                "kept": kept.get().tolist(),
                "total": total,
            }
        ),
        flush=True,
    )
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
