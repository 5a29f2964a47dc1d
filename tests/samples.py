"""Sample objects shared by tests in several folders (tests/ is on sys.path)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GiB = 1 << 30


def report_status(
    generation: int, *, state: str = "Applied", unaccounted: int = 0, policy: str = "shm"
) -> dict[str, Any]:
    """A NodeMemoryReport status: one tmpfs item of `policy` at `generation` in `state`,
    a 16 GiB node with 2 GiB of Shmem of which `unaccounted` is in no known object."""
    return {
        "policies": [{"name": policy, "generation": generation}],
        "tmpfs": [
            {
                "path": "/dev/shm",
                "pattern": "/dev/shm",
                "policy": policy,
                "state": state,
                "message": "Too small a size for current use" if state == "Refused" else "",
            }
        ],
        "memory": {
            "totalBytes": 16 * GiB,
            "availableBytes": 8 * GiB,
            "shmemBytes": 2 * GiB,
            "slabBytes": 0,
            "slabReclaimableBytes": 0,
            "slabUnreclaimableBytes": 0,
            "kernelStackBytes": 0,
            "pageTablesBytes": 0,
            "vmallocUsedBytes": 0,
            "processRssBytes": 0,
        },
        "shmem": {
            "totalBytes": 2 * GiB,
            "attributedBytes": 2 * GiB - unaccounted,
            "unaccountedBytes": unaccounted,
            "byKind": {
                "tmpfs": 2 * GiB - unaccounted,
                "sysv": 0,
                "memfd": 0,
                "sharedAnon": 0,
                "detachedTmpfs": 0,
            },
            "top": [],
        },
    }


class FakeWallClock:
    """A wall clock the test moves (cron deadlines); starts at 00:30."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def write(path: Path, *, age: float = 0.0, size: int = 1) -> Path:
    """A file of `size` bytes whose atime and mtime are `age` seconds old."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def names(root: Path) -> set[str]:
    """Every file and symlink below root, as paths relative to it."""
    return {
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_symlink() or not path.is_dir()
    }


def exec_done(pid: int, argv: Sequence[str], timeout: float = 5.0) -> None:
    """Waits until a child's exec has finished. subprocess.Popen returns a moment before
    the kernel sets the new comm and then the cmdline: the cmdline is the last."""
    expected = ("\0".join(argv) + "\0").encode()
    deadline = time.monotonic() + timeout
    while (cmdline := Path(f"/proc/{pid}/cmdline").read_bytes()) != expected:
        assert time.monotonic() < deadline, f"pid {pid} is still {cmdline!r}, not {expected!r}"
        time.sleep(0.001)  # poll: exec completion has no event a parent can wait on
