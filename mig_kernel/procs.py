"""Facts about local processes from /proc (Linux): is a pid alive, and which process is it;
and the CPUs this one may run on."""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()  # the name in parentheses may hold spaces


def proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), None if gone.

    Together with the pid it names one process for good: a recycled pid has another start time.
    """
    fields = _stat_fields(pid)
    if fields is None or fields[0] == b"Z":  # a zombie has finished
        return None
    return int(fields[19])


def pid_alive(pid: int) -> bool:
    return proc_start_ticks(pid) is not None


def usable_cpus() -> int:
    """How many CPUs this process may run on: its affinity (a container's cpuset, taskset, a
    Slurm allocation), not the machine's count. A decision to spin needs this one: two
    processes spinning for each other on one CPU take turns by the scheduler's time slice
    (on the 2-core CPU machine, an empty call confined to one CPU took 211 us with the
    machine's count deciding, against 26 us for a bare pyzmq round trip)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (no affinity on this platform)
        return os.cpu_count() or 1


CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def capabilities() -> dict[str, int]:
    """This process's capability sets from /proc/self/status (bit masks)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in CAP_SETS:
                found[name] = int(value.strip(), 16)
    return found
