"""Reading /proc/PID/*: the process list, status fields, namespaces.

Processes come and go during a scan and some refuse to be read (EACCES on PID 1
here). Readers raise `ProcessGone` or `ProcessUnreadable`; callers count them.

Any process may name itself, its files and its mounts with bytes that are not UTF-8.
/proc text is decoded with U+FFFD for those, except where a path must still work in
system calls (mountinfo: surrogate escapes, as os.readlink and os.listdir give).
Reports make every name valid text (api.report.printable).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from nodemem.host.paths import HostPaths


class ProcessGone(Exception):  # noqa: N818 - a state, not a fault
    """The process exited while it was being read."""


class ProcessUnreadable(Exception):  # noqa: N818 - a state, not a fault
    """The kernel refused to show part of the process (EACCES, EPERM)."""

    def __init__(self, pid: int, what: str, error: OSError) -> None:
        super().__init__(f"pid {pid}: {what}: {error.strerror or error}")
        self.pid = pid
        self.what = what
        self.error = error


@dataclass(frozen=True)
class Holder:
    """A process that holds something (an fd, a mapping, an attach)."""

    pid: int
    comm: str


@dataclass(frozen=True)
class ProcStatus:
    """The fields of /proc/PID/status the agent uses. Sizes in bytes."""

    pid: int
    comm: str
    ppid: int
    uid: int
    kthread: bool
    rss_bytes: int
    rss_shmem_bytes: int
    swap_bytes: int
    pte_bytes: int
    vm_size_bytes: int = 0  # changes with every mmap/munmap: a cheap hint that maps changed


_GONE_ERRNOS = {errno.ENOENT, errno.ESRCH}
_REFUSED_ERRNOS = {errno.EACCES, errno.EPERM}


def classify(pid: int, what: str, error: OSError) -> Exception:
    """Map an OSError from /proc to ProcessGone / ProcessUnreadable (others stay)."""
    if error.errno in _GONE_ERRNOS:
        return ProcessGone(pid)
    if error.errno in _REFUSED_ERRNOS:
        return ProcessUnreadable(pid, what, error)
    return error


def list_pids(paths: HostPaths) -> list[int]:
    """Thread-group ids present in the proc root, ascending."""
    return sorted(int(name) for name in os.listdir(paths.proc_root) if name.isdigit())


# Anchored on "\n" (the text gets one in front): faster than ^ with MULTILINE (bench/parsers.py).
_STATUS_FIELD = re.compile(
    r"\n(Name|PPid|Uid|Kthread|VmSize|VmRSS|RssShmem|VmSwap|VmPTE):[ \t]*([^\n]*)"
)


def parse_status(pid: int, text: str) -> ProcStatus:
    """Parse the text of /proc/PID/status.

    Raises ValueError on content that is not a status file (missing Name/PPid/Uid).
    """
    fields = dict(_STATUS_FIELD.findall("\n" + text))
    try:
        comm = fields["Name"]
        ppid = int(fields["PPid"])
        uid = int(fields["Uid"].split()[0])
    except (KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"pid {pid}: not a /proc status file ({exc!r})") from None

    def kib(key: str) -> int:
        raw = fields.get(key)
        if raw is None:
            return 0
        number, _, unit = raw.partition(" ")
        if unit.strip() not in ("kB", ""):
            raise ValueError(f"pid {pid}: {key} has unit {unit!r}, expected kB")
        try:
            return int(number) * 1024
        except ValueError:
            raise ValueError(f"pid {pid}: {key} is not a number: {raw!r}") from None

    # Kernel threads have no mm: no VmSize line (and `Kthread: 1` on 6.x kernels).
    kthread = fields.get("Kthread") == "1" or "VmSize" not in fields
    return ProcStatus(
        pid=pid,
        comm=comm,
        ppid=ppid,
        uid=uid,
        kthread=kthread,
        rss_bytes=kib("VmRSS"),
        rss_shmem_bytes=kib("RssShmem"),
        swap_bytes=kib("VmSwap"),
        pte_bytes=kib("VmPTE"),
        vm_size_bytes=kib("VmSize"),
    )


def read_proc_text(path: str, errors: str = "replace", *, dir_fd: int | None = None) -> str:
    """A /proc (or /sys) file's text; bytes that are not UTF-8 become U+FFFD, or with
    errors="surrogateescape" stay usable in paths. With `dir_fd`, `path` is relative to
    that directory (a /proc/PID fd: the file of that very process, see open_process_dir).

    os.read rather than open(): half the cost of a text-mode file object per read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors=errors)


def read_status(paths: HostPaths, pid: int) -> ProcStatus:
    try:
        text = read_proc_text(f"{paths.proc_root}/{pid}/status")
    except OSError as exc:
        raise classify(pid, "status", exc) from exc
    return parse_status(pid, text)


def namespace_id(paths: HostPaths, pid: int | str, kind: str) -> int:
    """The inode number of `/proc/PID/ns/<kind>` (e.g. "mnt", "ipc")."""
    try:
        link = os.readlink(f"{paths.proc_root}/{pid}/ns/{kind}")
    except OSError as exc:
        raise classify(pid if isinstance(pid, int) else os.getpid(), f"ns/{kind}", exc) from exc
    # "mnt:[4026531832]"
    return int(link[link.index("[") + 1 : -1])


def read_text(paths: HostPaths, pid: int, name: str, errors: str = "replace") -> str:
    try:
        return read_proc_text(f"{paths.proc_root}/{pid}/{name}", errors)
    except OSError as exc:
        raise classify(pid, name, exc) from exc


def start_time(paths: HostPaths, pid: int) -> int:
    """Field 22 of /proc/PID/stat: when the process started (clock ticks since boot).
    With the pid it names one process over time (pids are reused)."""
    try:
        text = read_proc_text(f"{paths.proc_root}/{pid}/stat")
    except OSError as exc:
        raise classify(pid, "stat", exc) from exc
    return int(stat_fields(text)[19])


def stat_fields(text: str) -> list[str]:
    """The fields of /proc/PID/stat from field 3 on (index 0 is field 3, the state)."""
    # The comm field may contain spaces and parentheses: fields resume after the last ")".
    return text[text.rindex(")") + 2 :].split()


def open_process_dir(paths: HostPaths, pid: int) -> int:
    """An fd of the directory /proc/PID, to read (dir_fd=) files of this one process.

    The fd stays bound to the process it was opened on: once that process is gone,
    reads through it fail with ESRCH even if its pid names a new process by then.
    Raises ProcessGone / ProcessUnreadable.
    """
    try:
        return os.open(paths.proc(pid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise classify(pid, "proc directory", exc) from exc
