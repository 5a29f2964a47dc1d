"""/proc/meminfo: parsing and the breakdown of where the node's memory is."""

from __future__ import annotations

from dataclasses import dataclass

from nodemem.host.paths import HostPaths
from nodemem.host.procfs import read_proc_text


class MeminfoError(ValueError):
    """The text is not a meminfo file we can trust; no number is guessed."""


# The fields the breakdown needs; a meminfo without them is rejected, not zero-filled.
REQUIRED_FIELDS = (
    "MemTotal",
    "MemAvailable",
    "Shmem",
    "Slab",
    "SReclaimable",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "VmallocUsed",
    "SwapTotal",
)


def parse_meminfo(text: str) -> dict[str, int]:
    """Every `Key: N kB` line as bytes (`HugePages_*` counts stay counts)."""
    values: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not key or " " in key or len(parts) not in (1, 2):
            raise MeminfoError(f"meminfo line {number}: malformed: {line!r}")
        if not (parts[0].isascii() and parts[0].isdigit()):  # "²".isdigit(), int("²") fails
            raise MeminfoError(f"meminfo line {number}: {key} is not a number: {parts[0]!r}")
        if len(parts) == 2 and parts[1] != "kB":
            raise MeminfoError(f"meminfo line {number}: {key} has unit {parts[1]!r}, expected kB")
        if key in values:
            raise MeminfoError(f"meminfo line {number}: {key} appears twice")
        values[key] = int(parts[0]) * (1024 if len(parts) == 2 else 1)
    missing = [field for field in REQUIRED_FIELDS if field not in values]
    if missing:
        raise MeminfoError(f"meminfo lacks {', '.join(missing)}")
    return values


@dataclass(frozen=True)
class MemoryBreakdown:
    """Where the memory is, in bytes. `process_rss` is the sum of VmRSS (shared pages counted
    once per process), the figure `top` users add up."""

    total: int
    available: int
    shmem: int
    slab: int
    slab_reclaimable: int
    slab_unreclaimable: int
    kernel_stack: int
    page_tables: int
    vmalloc_used: int
    swap_total: int
    process_rss: int


def breakdown(meminfo: dict[str, int], process_rss: int) -> MemoryBreakdown:
    return MemoryBreakdown(
        total=meminfo["MemTotal"],
        available=meminfo["MemAvailable"],
        shmem=meminfo["Shmem"],
        slab=meminfo["Slab"],
        slab_reclaimable=meminfo["SReclaimable"],
        slab_unreclaimable=meminfo["SUnreclaim"],
        kernel_stack=meminfo["KernelStack"],
        page_tables=meminfo["PageTables"],
        vmalloc_used=meminfo["VmallocUsed"],
        swap_total=meminfo["SwapTotal"],
        process_rss=process_rss,
    )


# More than any machine holds (VmallocTotal, the largest real field, is ~12.5 PiB with
# 5-level paging): a number above it is corruption, not memory.
IMPLAUSIBLE_BYTES = 1 << 60


def implausible(memory: MemoryBreakdown) -> list[str]:
    """Why these numbers cannot all be true; [] for a sane meminfo. They are still shown
    (the kernel said them), but never as fact without these warnings."""
    if memory.total == 0:
        return ["MemTotal is 0: this /proc/meminfo does not describe a running machine"]
    warnings = []
    parts = {
        "MemAvailable": memory.available,
        "Shmem": memory.shmem,
        "Slab": memory.slab,
        "KernelStack": memory.kernel_stack,
        "PageTables": memory.page_tables,
    }
    for name, value in {"MemTotal": memory.total, **parts}.items():
        if value >= IMPLAUSIBLE_BYTES:
            warnings.append(f"{name} is {value} bytes, more than any machine has")
    for name, value in parts.items():
        if memory.total < value < IMPLAUSIBLE_BYTES:
            warnings.append(f"{name} ({value} bytes) exceeds MemTotal ({memory.total} bytes)")
    return warnings


def read_meminfo(paths: HostPaths) -> dict[str, int]:
    return parse_meminfo(read_proc_text(str(paths.proc("meminfo"))))
