"""Where the host is: one host root and one proc root for every host access.

Standalone both are the machine's own (`/`, `/proc`). In a pod with hostPID the
agent reaches the host's filesystem through `/proc/1/root` and keeps `/proc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostPaths:
    host_root: Path = Path("/")
    proc_root: Path = Path("/proc")

    def host(self, path: str | Path) -> Path:
        """A host path (absolute, as the host sees it) as reachable from here."""
        return self.host_root / str(path).lstrip("/")

    def proc(self, *parts: str | int) -> Path:
        """`<proc root>/<parts...>`, e.g. `proc(42, "status")`."""
        return self.proc_root.joinpath(*(str(part) for part in parts))

    def in_namespace_of(self, pid: int, path: str) -> Path:
        """`path` as seen in the mount namespace of `pid` (through its /proc root link)."""
        return self.proc(pid, "root") / path.lstrip("/")
