"""Reading and setting /proc/PID/oom_score_adj, with every outcome named.

Kernel rules (docs/kernel-facts.md#oom_score_adj): raising needs no capability; going below the
process's floor `oom_score_adj_min` (0 unless a writer with CAP_SYS_RESOURCE set
it) needs CAP_SYS_RESOURCE and fails with EACCES otherwise. PID 1, kernel threads
and the agent itself are never written.

A pid can name another process by the time of the write (the matched one exited and
the pid was reused): the write goes through a /proc/PID directory fd, and the start
time read through it after opening the file must be the one matched.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from enum import StrEnum

from nodemem.host.identity import PF_KTHREAD
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import (
    ProcessGone,
    ProcessUnreadable,
    classify,
    open_process_dir,
    read_proc_text,
    stat_fields,
)

OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000
CAP_SYS_RESOURCE = 24


class AdjState(StrEnum):
    ADJUSTED = "Adjusted"
    UNCHANGED = "Unchanged"  # already at the value: nothing written
    FORBIDDEN = "Forbidden"  # the kernel refused (EACCES/EPERM)
    GONE = "Gone"  # the process exited; callers skip it silently
    # The matched process is not there at the write: its pid names another process
    # (pid reuse) or it exited. Nothing written; not a failure.
    VANISHED = "Vanished"
    REFUSED = "Refused"  # PID 1, a kernel thread or the agent itself: never written
    FAILED = "Failed"  # anything else


@dataclass(frozen=True)
class AdjResult:
    pid: int
    state: AdjState
    requested: int
    previous: int | None  # the value before; None when it could not be read
    message: str


def _read_adj_once(path: str, dir_fd: int | None = None) -> str:
    """oom_score_adj ("-1000\n" at most) in one read(2) (see read_oom_score_adj)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, 64).decode(errors="replace")
    finally:
        os.close(fd)


def read_oom_score_adj(paths: HostPaths, pid: int) -> int:
    """Raises procfs.ProcessGone / ProcessUnreadable.

    One read(2): the kernel formats this file anew at each read, so a second read at
    offset 2 returns the tail of a value written in between ("0\n" then "0\n" of "600\n").
    """
    try:
        text = _read_adj_once(str(paths.proc(pid, "oom_score_adj")))
    except OSError as exc:
        raise classify(pid, "oom_score_adj", exc) from exc
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


def _refusal(pid: int) -> str | None:
    """Why this pid must never be written, or None (kernel threads: see _set_at)."""
    if pid == 1:
        return "PID 1 (init) is never touched"
    if pid == os.getpid():
        return "the agent's own process is never touched"
    if pid <= 0:
        return f"{pid} is not a process id"
    return None


def set_oom_score_adj(
    paths: HostPaths, pid: int, value: int, expected_start: int | None = None
) -> AdjResult:
    """Set a process's oom_score_adj to `value` (-1000..1000, else ValueError).

    `expected_start` is the start time (procfs.start_time) of the process the caller
    matched, read before it matched: the value is written only if `pid` still names
    that process, else Vanished (also when it exited: the matched process is not there).
    Without it the identity is taken at the call, and an exit is Gone.
    """
    if not OOM_SCORE_ADJ_MIN <= value <= OOM_SCORE_ADJ_MAX:
        raise ValueError(f"oom_score_adj {value} outside {OOM_SCORE_ADJ_MIN}..{OOM_SCORE_ADJ_MAX}")
    refusal = _refusal(pid)
    if refusal is not None:
        return AdjResult(pid, AdjState.REFUSED, value, None, refusal)
    try:
        # Everything below goes through this fd: it stays bound to the process it was
        # opened on, whatever process the pid names later (pid reuse).
        dir_fd = open_process_dir(paths, pid)
    except ProcessGone:
        return _gone(pid, value, None, expected_start)
    except ProcessUnreadable as exc:
        return AdjResult(pid, AdjState.FAILED, value, None, str(exc))
    try:
        return _set_at(dir_fd, pid, value, expected_start)
    finally:
        os.close(dir_fd)


def _gone(pid: int, value: int, previous: int | None, expected_start: int | None) -> AdjResult:
    if expected_start is None:
        return AdjResult(pid, AdjState.GONE, value, previous, "the process exited")
    return AdjResult(pid, AdjState.VANISHED, value, previous, "the process exited before the write")


def _read_at(dir_fd: int, pid: int, name: str) -> str:
    """A file of the process of dir_fd. Raises ProcessGone / ProcessUnreadable / OSError."""
    try:
        if name == "oom_score_adj":
            return _read_adj_once(name, dir_fd)
        return read_proc_text(name, dir_fd=dir_fd)
    except OSError as exc:
        raise classify(pid, name, exc) from exc


def _read_stat_at(dir_fd: int, pid: int) -> tuple[int, bool]:
    """(start time, kernel thread) of the process of dir_fd."""
    fields = stat_fields(_read_at(dir_fd, pid, "stat"))
    return int(fields[19]), bool(int(fields[6]) & PF_KTHREAD)  # fields 22 and 9


def _set_at(dir_fd: int, pid: int, value: int, expected_start: int | None) -> AdjResult:
    def result(state: AdjState, previous: int | None, message: str) -> AdjResult:
        return AdjResult(pid, state, value, previous, message)

    def reused(now: int, matched: int) -> AdjResult:
        return result(
            AdjState.VANISHED,
            None,  # a value read there would be another process's
            f"pid {pid} now names another process (started at tick {now}, the matched "
            f"one at {matched}): nothing written",
        )

    try:
        started, kthread = _read_stat_at(dir_fd, pid)
        if expected_start is not None and started != expected_start:
            return reused(started, expected_start)
        if kthread:
            return result(AdjState.REFUSED, None, "kernel threads are never touched")
        text = _read_at(dir_fd, pid, "oom_score_adj")
    except ProcessGone:
        return _gone(pid, value, None, expected_start)
    except (ProcessUnreadable, OSError) as exc:
        return result(AdjState.FAILED, None, str(exc))
    except (ValueError, IndexError) as exc:
        return result(AdjState.FAILED, None, f"pid {pid}: unreadable stat: {exc!r}")
    try:
        previous = int(text.strip())
    except ValueError:
        return result(AdjState.FAILED, None, f"pid {pid}: oom_score_adj is not a number: {text!r}")
    if previous == value:
        return result(AdjState.UNCHANGED, previous, f"already {value}")

    try:
        # os.write, not a buffered file: the kernel's errno must come from this write.
        fd = os.open("oom_score_adj", os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            # Checked again after the open, through the same dir fd: the file is this
            # process's, and a reused pid or an exit since the first check shows here.
            now_started, _ = _read_stat_at(dir_fd, pid)
            if now_started != started:
                return reused(now_started, started)
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
    except ProcessGone:
        return _gone(pid, value, previous, expected_start)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            return _gone(pid, value, previous, expected_start)
        if exc.errno in (errno.EACCES, errno.EPERM):
            return result(AdjState.FORBIDDEN, previous, _forbidden_message(previous, value, exc))
        return result(AdjState.FAILED, previous, f"writing oom_score_adj: {exc.strerror or exc}")
    except (ProcessUnreadable, ValueError, IndexError) as exc:
        return result(AdjState.FAILED, previous, f"pid {pid}: re-reading stat: {exc!r}")
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
