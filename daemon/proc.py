"""Process identity on Linux: a pid plus its start time is one incarnation (a reused
pid is another process)."""

from __future__ import annotations

import os
from datetime import UTC, datetime

_TICKS = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


_BOOT = _boot_time()


def start_time(pid: int) -> datetime | None:
    """When the process started, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[19])  # field 22 of stat, counted from after the name
    if fields[0] == "Z":
        return None  # a zombie has exited already
    return datetime.fromtimestamp(_BOOT + ticks / _TICKS, UTC)


def same_process(pid: int, started_at: datetime) -> bool:
    current = start_time(pid)
    return current is not None and abs((current - started_at).total_seconds()) < 0.02
