"""Reading and setting /proc/PID/oom_score_adj, with every outcome named.

Kernel rules (kernel-memory.md 5.4): raising needs no capability; going below the
process's floor `oom_score_adj_min` (0 unless a writer with CAP_SYS_RESOURCE set
it) needs CAP_SYS_RESOURCE and fails with EACCES otherwise. PID 1, kernel threads
and the agent itself are never written.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from enum import StrEnum

from nodemem.host.identity import is_kernel_thread
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import ProcessGone, ProcessUnreadable, read_text

OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000
CAP_SYS_RESOURCE = 24


class AdjState(StrEnum):
    ADJUSTED = "Adjusted"
    UNCHANGED = "Unchanged"  # already at the value: nothing written
    FORBIDDEN = "Forbidden"  # the kernel refused (EACCES/EPERM)
    GONE = "Gone"  # the process exited; callers skip it silently
    REFUSED = "Refused"  # PID 1, a kernel thread or the agent itself: never written
    FAILED = "Failed"  # anything else


@dataclass(frozen=True)
class AdjResult:
    pid: int
    state: AdjState
    requested: int
    previous: int | None  # the value before; None when it could not be read
    message: str


def read_oom_score_adj(paths: HostPaths, pid: int) -> int:
    """Raises procfs.ProcessGone / ProcessUnreadable."""
    text = read_text(paths, pid, "oom_score_adj")
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"pid {pid}: oom_score_adj is not a number: {text!r}") from None


def has_cap_sys_resource(paths: HostPaths | None = None) -> bool:
    """Whether this process has CAP_SYS_RESOURCE in its effective set."""
    with open((paths or HostPaths()).proc("self", "status")) as status:
        lines = status.read().splitlines()
    for line in lines:
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << CAP_SYS_RESOURCE))
    return False


def _refusal(paths: HostPaths, pid: int) -> str | None:
    """Why this pid must never be written, or None. Raises ProcessGone."""
    if pid == 1:
        return "PID 1 (init) is never touched"
    if pid == os.getpid():
        return "the agent's own process is never touched"
    if pid <= 0:
        return f"{pid} is not a process id"
    if is_kernel_thread(paths, pid):
        return "kernel threads are never touched"
    return None


def set_oom_score_adj(paths: HostPaths, pid: int, value: int) -> AdjResult:
    """Set a process's oom_score_adj to `value` (-1000..1000, else ValueError)."""
    if not OOM_SCORE_ADJ_MIN <= value <= OOM_SCORE_ADJ_MAX:
        raise ValueError(f"oom_score_adj {value} outside {OOM_SCORE_ADJ_MIN}..{OOM_SCORE_ADJ_MAX}")

    def result(state: AdjState, previous: int | None, message: str) -> AdjResult:
        return AdjResult(pid, state, value, previous, message)

    try:
        refusal = _refusal(paths, pid)
        if refusal is not None:
            return result(AdjState.REFUSED, None, refusal)
        previous = read_oom_score_adj(paths, pid)
    except ProcessGone:
        return result(AdjState.GONE, None, "the process exited")
    except (ProcessUnreadable, ValueError) as exc:
        return result(AdjState.FAILED, None, str(exc))
    if previous == value:
        return result(AdjState.UNCHANGED, previous, f"already {value}")

    try:
        # os.write, not a buffered file: the kernel's errno must come from this write.
        fd = os.open(paths.proc(pid, "oom_score_adj"), os.O_WRONLY)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            return result(AdjState.GONE, previous, "the process exited")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return result(AdjState.FORBIDDEN, previous, _forbidden_message(previous, value, exc))
        return result(AdjState.FAILED, previous, f"writing oom_score_adj: {exc.strerror or exc}")
    return result(AdjState.ADJUSTED, previous, f"{previous} -> {value}")


def _forbidden_message(previous: int, value: int, error: OSError) -> str:
    reason = error.strerror or str(error)
    # Our own capabilities: /proc/self of this process, whatever the host's proc root is.
    if value < previous and not has_cap_sys_resource():
        return (
            f"lowering oom_score_adj from {previous} to {value} was refused ({reason}): "
            "going below the process's floor (oom_score_adj_min, 0 unless a privileged "
            "writer set it) needs CAP_SYS_RESOURCE, which this agent lacks"
        )
    return (
        f"writing oom_score_adj {value} was refused ({reason}): no permission to write "
        "this process's oom_score_adj (another user's process without CAP_DAC_OVERRIDE, "
        "or a security module)"
    )
