"""Host health through psutil: memory pressure, local-tier free space, processes alive."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import psutil

MEMORY_PRESSURE = 0.92
"""Used fraction of host memory that counts as pressure."""
DISK_LOW = 0.05
"""Free fraction of the local tier's disk that counts as low."""


@dataclass
class HostReport:
    memory_used: float
    memory_pressure: bool
    disks: dict[str, float]
    low_disks: list[str]


def host_report(paths: list[str]) -> HostReport:
    vm = psutil.virtual_memory()
    used = vm.percent / 100.0
    disks = {}
    for p in paths:
        try:
            usage = shutil.disk_usage(p)
            disks[p] = usage.free / usage.total
        except OSError:
            continue
    return HostReport(used, used >= MEMORY_PRESSURE, disks, [p for p, free in disks.items() if free < DISK_LOW])


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def started_at(pid: int | str = "self") -> float | None:
    """When process ``pid`` was created (Unix seconds) to a clock tick; None if it is gone or unreadable.

    From /proc/<pid>/stat's start time against CLOCK_BOOTTIME: psutil's create_time adds the boot time in
    whole seconds, so it can be a second off.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22, starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age if 0 <= age < 365 * 86400 else None
