"""CPU time and resident memory of the benchmark's server processes, read from outside them.

`gateway_overhead.py` runs the backend and the gateway as separate processes and must not touch
them while they serve, so it reads what the kernel already counts: user + system CPU time from
/proc/PID/stat (Linux only: elsewhere `cpu_seconds` is None and the rows carry no CPU figures) and
RSS through psutil. CPU time per request (`CpuMeter`) varies much less than throughput on a busy,
shared machine, and RSS sampled over a long run (the soak) shows whether the gateway keeps memory
bounded. `family` adds a process's children, since a gateway with several workers is a supervisor
and one process per worker.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any


def rss_mib(pids: list[int]) -> float:
    """Resident memory of processes together, in MiB (one that has exited counts as 0)."""
    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return round(total / 2**20, 1)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def family(pid: int) -> list[int]:
    """A process and its children (the gateway's workers when it runs several)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *(int(c) for c in children)]


class CpuMeter:
    """CPU time that groups of processes spend while a measurement runs."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start: dict[str, float | None] = {}
        self.spent: dict[str, float | None] = {}

    def _total(self, pids: list[int]) -> float | None:
        values = [cpu_seconds(p) for p in pids]
        return None if any(v is None for v in values) else sum(v for v in values if v is not None)

    def __enter__(self) -> CpuMeter:
        self.start = {name: self._total(pids) for name, pids in self.groups.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        for name, pids in self.groups.items():
            before, after = self.start[name], self._total(pids)
            self.spent[name] = None if before is None or after is None else after - before

    def attach(self, row: dict[str, Any], requests: int) -> None:
        """Add ``cpu_us_per_request`` (per process group) to a result row."""
        if requests and all(v is not None for v in self.spent.values()):
            row["cpu_us_per_request"] = {
                name: round(spent * 1e6 / requests, 1) for name, spent in self.spent.items() if spent is not None
            }
