"""Node-wide OOM kills (/proc/vmstat) and memory pressure (/proc/pressure/memory).

Both are one small read of a global (not namespaced) /proc file, cheap enough for every
cycle of the agent. Either may be missing: `oom_kill` appeared in Linux 4.13, and PSI
needs CONFIG_PSI and is off with `psi=0` on the kernel command line; then the reader
returns None and the agent exports no series for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodemem.host.paths import HostPaths
from nodemem.host.procfs import read_proc_text


@dataclass(frozen=True)
class PressureLine:
    """One line of a PSI file: the share of wall time (percent) some or all runnable
    tasks stalled on memory over the last 10 s and 60 s, and the total since boot."""

    avg10: float
    avg60: float
    total_us: int


def parse_oom_kills(text: str) -> int | None:
    """The `oom_kill` counter of /proc/vmstat: OOM kills since boot (None: not there)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def parse_pressure(text: str) -> dict[str, float]:
    """`{"some": seconds, "full": seconds}`: total stall time since boot, from the
    microsecond `total=` fields of a PSI file. Lines that do not parse are left out."""
    stalls: dict[str, float] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        if kind not in ("some", "full"):
            continue
        for field in fields:
            key, _, value = field.partition("=")
            if key == "total" and value.isdigit():
                stalls[kind] = int(value) / 1e6
    return stalls


def read_oom_kills(paths: HostPaths) -> int | None:
    try:
        return parse_oom_kills(read_proc_text(str(paths.proc("vmstat"))))
    except OSError:
        return None


def read_memory_pressure(paths: HostPaths) -> dict[str, float] | None:
    """Stall seconds by kind, or None where the kernel has no PSI (no such file, or
    EOPNOTSUPP when PSI is compiled in but disabled at boot)."""
    try:
        return parse_pressure(read_proc_text(str(paths.proc("pressure", "memory")))) or None
    except OSError:
        return None


def parse_pressure_lines(text: str) -> dict[str, PressureLine]:
    """`{"some": PressureLine, "full": ...}` from a PSI file; lines that do not parse
    are left out (`full` is absent from the system-wide cpu file before 5.13)."""
    lines: dict[str, PressureLine] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        values = dict(field.partition("=")[::2] for field in fields)
        try:
            lines[kind] = PressureLine(
                float(values["avg10"]), float(values["avg60"]), int(values["total"])
            )
        except (KeyError, ValueError):
            continue
    return {kind: line for kind, line in lines.items() if kind in ("some", "full")}


def read_pressure_lines(paths: HostPaths) -> dict[str, PressureLine] | None:
    """/proc/pressure/memory by kind; None without PSI (as read_memory_pressure)."""
    try:
        return parse_pressure_lines(read_proc_text(str(paths.proc("pressure", "memory")))) or None
    except OSError:
        return None
