"""Facts about local processes from /proc (Linux): is a pid alive, and which process is it."""

from __future__ import annotations


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
