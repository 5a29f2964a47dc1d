"""Per-process memory from /proc/PID/smaps_rollup: RSS, PSS, USS and the process's Shmem.

smaps_rollup (kernel 4.14+) is the sum of a process's smaps in one file: the kernel
walks every mapping's page tables, so it costs more than `status`, and only as much
as the process has mapped. PSS divides each page by the number of processes mapping
it, so PSS summed over all processes counts every page once; USS is what only this
process maps (Private_Clean + Private_Dirty): what killing it would free.

Reading it needs PTRACE_MODE_READ (another user's process: EACCES without
CAP_SYS_PTRACE). Kernel threads and zombies have no mm: the read fails with ESRCH,
which `classify` makes ProcessGone, the same as a process that exited meanwhile.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from nodemem.host.paths import HostPaths
from nodemem.host.procfs import (
    ProcessGone,
    ProcessUnreadable,
    ProcStatus,
    classify,
    read_proc_text,
)


class SmapsError(ValueError):
    """The text is not an smaps_rollup we can trust; no number is guessed."""


REQUIRED_FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty")
# More than any machine holds (as meminfo.IMPLAUSIBLE_BYTES): corruption, not memory.
IMPLAUSIBLE_BYTES = 1 << 60
# `start-end ---p 00000000 00:00 0    [rollup]`: the span of all mappings.
_HEADER = re.compile(r"[0-9a-f]+-[0-9a-f]+ \S+ [0-9a-f]+ [0-9a-f]+:[0-9a-f]+ \d+ +\[rollup\]")


@dataclass(frozen=True)
class SmapsRollup:
    """One process's totals, in bytes."""

    rss: int
    pss: int
    private_clean: int
    private_dirty: int
    pss_shmem: int | None  # None before kernel 5.7, which added the Pss_* breakdown

    @property
    def uss(self) -> int:
        return self.private_clean + self.private_dirty


def parse_smaps_rollup(text: str) -> SmapsRollup | None:
    """The totals in the text of /proc/PID/smaps_rollup; None for an empty file (no mm).

    Raises SmapsError naming the line for anything else than `Key: N kB` lines after
    the optional `[rollup]` header, a key given twice, a required field missing, or
    numbers that cannot all be true (PSS or USS above RSS, more than 2^60 bytes).
    """
    values: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if number == 1 and _HEADER.fullmatch(line):
            continue
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or key.split() != [key] or len(parts) != 2:
            raise SmapsError(f"smaps_rollup line {number}: malformed: {line[:80]!r}")
        if not (parts[0].isascii() and parts[0].isdigit()):  # "²".isdigit(), int("²") fails
            raise SmapsError(f"smaps_rollup line {number}: {key} is not a number: {parts[0]!r}")
        if parts[1] != "kB":
            raise SmapsError(f"smaps_rollup line {number}: {key} has unit {parts[1]!r}, not kB")
        if key in values:
            raise SmapsError(f"smaps_rollup line {number}: {key} appears twice")
        # Length first: int() refuses more than 4300 digits with its own ValueError.
        if len(parts[0]) > 18 or (value := int(parts[0]) * 1024) >= IMPLAUSIBLE_BYTES:
            raise SmapsError(f"smaps_rollup line {number}: {key} is over 2^60 bytes")
        values[key] = value
    if not values:
        if text.strip():  # a header and nothing else
            raise SmapsError("smaps_rollup has a header but no fields")
        return None
    missing = [name for name in REQUIRED_FIELDS if name not in values]
    if missing:
        raise SmapsError(f"smaps_rollup lacks {', '.join(missing)}")
    rollup = SmapsRollup(
        rss=values["Rss"],
        pss=values["Pss"],
        private_clean=values["Private_Clean"],
        private_dirty=values["Private_Dirty"],
        pss_shmem=values.get("Pss_Shmem"),
    )
    # The kernel sums Rss from the same pages as Private_* and divides them for Pss.
    for name, part in (("Pss", rollup.pss), ("Private_Clean + Private_Dirty", rollup.uss)):
        if part > rollup.rss:
            raise SmapsError(f"smaps_rollup: {name} ({part} bytes) exceeds Rss ({rollup.rss})")
    if rollup.pss_shmem is not None and rollup.pss_shmem > rollup.pss:
        raise SmapsError(
            f"smaps_rollup: Pss_Shmem ({rollup.pss_shmem} bytes) exceeds Pss ({rollup.pss})"
        )
    return rollup


def read_smaps_rollup(paths: HostPaths, pid: int) -> SmapsRollup | None:
    """Raises ProcessGone (exited, zombie, kernel thread), ProcessUnreadable (refused),
    SmapsError (content that cannot be trusted)."""
    try:
        text = read_proc_text(f"{paths.proc_root}/{pid}/smaps_rollup")
    except OSError as exc:
        raise classify(pid, "smaps_rollup", exc) from exc
    return parse_smaps_rollup(text)


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    comm: str
    rss: int
    pss: int
    uss: int
    pss_shmem: int | None
    rss_shmem: int  # status RssShmem: the Shmem pages it maps, whoever else maps them


@dataclass(frozen=True)
class ProcessFailure:
    """A process whose smaps_rollup was refused or could not be trusted."""

    pid: int
    comm: str
    reason: str


@dataclass
class ProcessAccounting:
    processes: list[ProcessMemory] = field(default_factory=list)  # largest PSS first
    failures: list[ProcessFailure] = field(default_factory=list)


def account_processes(paths: HostPaths, statuses: Mapping[int, ProcStatus]) -> ProcessAccounting:
    """smaps_rollup of every process in `statuses` (the attribution pass read them).

    Kernel threads are skipped unread (they have no memory of their own); a refusal
    or a file that does not parse is counted in `failures`, never raised.
    """
    result = ProcessAccounting()
    for pid, status in statuses.items():
        if status.kthread:
            continue
        try:
            rollup = read_smaps_rollup(paths, pid)
        except ProcessGone:
            continue
        except ProcessUnreadable as exc:
            reason = exc.error.strerror or str(exc.error)
            result.failures.append(ProcessFailure(pid, status.comm, reason))
            continue
        except SmapsError as exc:
            result.failures.append(ProcessFailure(pid, status.comm, str(exc)))
            continue
        if rollup is None:
            continue
        result.processes.append(
            ProcessMemory(
                pid=pid,
                comm=status.comm,
                rss=rollup.rss,
                pss=rollup.pss,
                uss=rollup.uss,
                pss_shmem=rollup.pss_shmem,
                rss_shmem=status.rss_shmem_bytes,
            )
        )
    result.processes.sort(key=lambda p: (p.pss, p.pid), reverse=True)
    return result
