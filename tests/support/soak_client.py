"""One client of the reliability soak (tests/test_reliability_soak.py), in a process of its
own so the test can SIGKILL or SIGSTOP it: it leases a slice with a short idle timeout, runs
invocations whose results it checks, keeps an array on the slice across idle reclaims, and
prints one JSON line of counts at the end.

``python -m tests.support.soak_client BROKER_JSON INVOCATIONS SEED`` (repository root).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter

import numpy as np

import mig_kernel
from mig_kernel.wire.errors import MigKernelError

IDLE_TIMEOUT = 1.0  # seconds: pauses longer than this are reclaimed, and restored on the next call


def main() -> None:
    broker, invocations, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    session = None
    kept, kept_value = None, 0
    for i in range(invocations):
        try:
            if session is None:
                session = mig_kernel.connect(broker=broker, idle_timeout=IDLE_TIMEOUT)
                counts["leases"] += 1
            x = np.arange(1000, dtype=np.int64) + i
            result = session.run(lambda a: int((a * 2).sum()), x)
            counts["ok" if result == int((x * 2).sum()) else "wrong"] += 1
            if kept is None:
                kept_value = rng.randrange(1000)
                kept = session.run(lambda v: xp.full(4, v), kept_value)  # noqa: F821
            else:
                total = session.run(lambda a: int(a.sum()), kept)
                counts["kept_ok" if total == 4 * kept_value else "wrong"] += 1
            if rng.random() < 0.2:
                time.sleep(IDLE_TIMEOUT * 1.5)  # idle: reclaimed, restored by the next call
                counts["idle_pauses"] += 1
        except MigKernelError as exc:
            errors[type(exc).__name__] += 1
            kept = None  # an executor that died took its device data (the promise allows it)
            if session is not None and (session.ended or session.released):
                session.release()
                session = None
            time.sleep(0.2)
    if session is not None:
        try:
            session.release()
        except MigKernelError as exc:
            errors[f"release:{type(exc).__name__}"] += 1
    reacquires = counts["leases"]
    print(json.dumps({"counts": dict(counts), "errors": dict(errors), "leases": reacquires}))


if __name__ == "__main__":
    main()
