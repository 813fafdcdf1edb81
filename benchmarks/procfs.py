"""CPU time and memory of processes, read from Linux /proc."""

from __future__ import annotations

import os
from typing import Dict, List

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> List[bytes]:
    """Return the fields of /proc/PID/stat after the command name, starting at the state."""
    with open(f"/proc/{pid}/stat", "rb") as stat_file:
        stat = stat_file.read()
    # The command name in parentheses may contain spaces; fields after it do not.
    return stat[stat.rindex(b")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds of every thread of one process, children excluded.

    The resolution is one clock tick (usually 10 ms).
    """
    fields = _stat_fields(pid)
    # Fields 14 and 15 of proc(5), utime and stime, are 11 and 12 after the state field.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def memory_kib(pid: int, field: str) -> int:
    """Return a memory field of /proc/PID/status in KiB, such as "VmRSS" or "VmHWM" (peak RSS)."""
    prefix = field.encode() + b":"
    with open(f"/proc/{pid}/status", "rb") as status_file:
        for line in status_file:
            if line.startswith(prefix):
                return int(line.split()[1])
    raise ValueError(f"/proc/{pid}/status has no {field} field")


def process_tree(root_pid: int) -> List[int]:
    """Return root_pid and the pids of its living descendants, from /proc."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except (OSError, ValueError):
            continue
        if fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(entry))

    found = [root_pid]
    pending = [root_pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def tree_cpu_seconds(root_pid: int) -> Dict[int, float]:
    """Return the CPU seconds of root_pid and of each living descendant, by pid."""
    seconds = {}
    for pid in process_tree(root_pid):
        try:
            seconds[pid] = cpu_seconds(pid)
        except (OSError, ValueError):
            pass  # exited since the scan
    return seconds


def tree_cpu_delta(before: Dict[int, float], after: Dict[int, float]) -> float:
    """Return the CPU seconds a process tree used between two tree_cpu_seconds() snapshots.

    A process that exited in between is missed, so this is a lower bound
    when the tree replaced processes during the interval.
    """
    total = 0.0
    for pid, seconds in after.items():
        previous = before.get(pid, 0.0)
        # Less time than before means the pid now belongs to a new process.
        total += seconds - previous if seconds >= previous else seconds
    return total


def tree_rss_kib(root_pid: int) -> int:
    """Return the sum of VmRSS over root_pid and its descendants; shared pages count once per process."""
    total = 0
    for pid in process_tree(root_pid):
        try:
            total += memory_kib(pid, "VmRSS")
        except (OSError, ValueError):
            pass
    return total
