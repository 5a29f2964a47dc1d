"""What the host tests' Shmem guard measures: the Shmem the tests themselves created.

On a v1 host this pytest process moves, for the session, into a memory cgroup of its own;
every process it starts inherits it and memcg_root is made below it. The kernel charges
a tmpfs, memfd, POSIX or SysV page to the cgroup of the task that first touches it (and,
when a cgroup is removed, moves its charges to the parent), so the cgroup's hierarchical
`total_shmem` counts what the tests made and nothing that other processes on the machine
do. Without a v1 memory hierarchy (the cgroup-v2 guest, which is the suite's alone) or
without root, the machine's Shmem (/proc/meminfo) is what is measured.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

from memcg_helpers import MEMORY_V1, remove_cgroup_tree

SLACK = 1 << 20  # bytes a test may leave behind (page-cache granularity, kernel lag)


def machine_shmem() -> int:
    with open("/proc/meminfo") as meminfo:
        line = next(line for line in meminfo if line.startswith("Shmem:"))
    return int(line.split()[1]) * 1024


def _own_memory_cgroup() -> Path | None:
    """The v1 memory cgroup this process is in, as a directory, or None."""
    with open("/proc/self/cgroup") as cgroups:
        for line in cgroups:
            _id, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return MEMORY_V1 / path.lstrip("/")
    return None


def _remove_stale() -> None:
    """The cgroups of sessions that were killed before they could remove theirs."""
    for stale in MEMORY_V1.glob("nodemem-tests-*-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):  # still busy: left for a later session
                remove_cgroup_tree(stale, timeout=0.5)


class ShmemMeter:
    """Shmem charged to this session's memory cgroup, or the machine's when there is none."""

    def __init__(self) -> None:
        self.cgroup: Path | None = None
        self.original = _own_memory_cgroup()
        if os.geteuid() != 0 or self.original is None or not (MEMORY_V1 / "cgroup.procs").exists():
            return
        _remove_stale()
        cgroup = MEMORY_V1 / f"nodemem-tests-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            cgroup.mkdir()
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            remove_cgroup_tree(cgroup, timeout=1)
            return
        self.cgroup = cgroup

    def bytes(self) -> int:
        if self.cgroup is None:
            return machine_shmem()
        with open(self.cgroup / "memory.stat") as stat:
            line = next(line for line in stat if line.startswith("total_shmem "))
        return int(line.split()[1])

    def left_behind(self, start: int, timeout: float = 10.0) -> int:
        """Bytes above `start` still there after waiting up to `timeout` for them to go
        (IPC namespaces are freed by a kernel work item, processes take a moment to exit);
        0 when they went."""
        deadline = time.monotonic() + timeout
        while (now := self.bytes()) > start + SLACK:
            if time.monotonic() > deadline:
                return now - start
            time.sleep(0.02)
        return 0

    def close(self) -> None:
        if self.cgroup is None or self.original is None:
            return
        (self.original / "cgroup.procs").write_text(str(os.getpid()))
        with contextlib.suppress(OSError):  # a stray child of a failed test: left there
            remove_cgroup_tree(self.cgroup, timeout=5)
        self.cgroup = None
