"""Sample objects shared by tests in several folders (tests/ is on sys.path)."""

from __future__ import annotations

from datetime import UTC, datetime
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
