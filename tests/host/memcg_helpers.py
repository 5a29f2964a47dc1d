"""Memory cgroups for host tests: created under the test's own v1 cgroup, always removed."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

MEMORY_V1 = Path("/sys/fs/cgroup/memory")
UNIFIED = Path("/sys/fs/cgroup")  # cgroup v2 (in the guest)


def remove_cgroup_tree(top: Path, timeout: float = 10.0) -> None:
    """rmdir children first; a cgroup refuses (EBUSY) until its last task is gone."""
    deadline = time.monotonic() + timeout
    for current, _dirs, _files in os.walk(top, topdown=False):
        while True:
            try:
                os.rmdir(current)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)  # poll: tasks are still exiting


def joining(cgroup: Path) -> Callable[[], None]:
    """A preexec_fn that moves the child into `cgroup` before it execs (and allocates)."""
    procs_file = str(cgroup / "cgroup.procs")

    def join() -> None:
        with open(procs_file, "w") as file:
            file.write(str(os.getpid()))

    return join


def make_v2_cgroup(root: Path, relative: str) -> Path:
    """mkdir -p in the v2 tree, each level delegating memory to the next (processes go
    only into the leaf: v2 forbids them in a cgroup that delegates a controller)."""
    current = root
    for name in relative.split("/"):
        (current / "cgroup.subtree_control").write_text("+memory")
        current = current / name
        current.mkdir(exist_ok=True)
    return current
