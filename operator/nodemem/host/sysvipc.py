"""SysV shared memory segments, in every IPC namespace.

/proc/sysvipc/shm lists only the reader's IPC namespace (see
docs/kernel-facts.md#sysv-per-ipc-namespace), so segments of other namespaces are read
from a short-lived thread that setns()es into them: IPC setns changes only the calling
thread's nsproxy, and the thread then ends.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

from nodemem.host.paths import HostPaths
from nodemem.host.procfs import read_proc_text

CLONE_NEWIPC = 0x08000000
_COLUMNS = [
    "key",
    "shmid",
    "perms",
    "size",
    "cpid",
    "lpid",
    "nattch",
    "uid",
    "gid",
    "cuid",
    "cgid",
    "atime",
    "dtime",
    "ctime",
    "rss",
    "swap",
]


class SysvParseError(ValueError):
    pass


@dataclass(frozen=True)
class SysvSegment:
    key: int
    shmid: int
    size: int  # requested size; not memory
    cpid: int
    lpid: int
    nattch: int
    uid: int
    rss_bytes: int  # resident: this is the Shmem share
    swap_bytes: int


def parse_sysvipc_shm(text: str) -> list[SysvSegment]:
    lines = text.splitlines()
    if not lines or lines[0].split() != _COLUMNS:
        raise SysvParseError(
            "sysvipc/shm: unexpected header "
            f"{lines[0].split() if lines else 'missing'!r}, expected {' '.join(_COLUMNS)}"
        )
    segments = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != len(_COLUMNS):
            raise SysvParseError(f"sysvipc/shm line {number}: {len(fields)} columns: {line!r}")
        try:
            row = dict(zip(_COLUMNS, (int(field) for field in fields), strict=True))
        except ValueError:
            raise SysvParseError(f"sysvipc/shm line {number}: not numeric: {line!r}") from None
        if min(row["shmid"], row["size"], row["nattch"], row["rss"], row["swap"]) < 0:
            raise SysvParseError(f"sysvipc/shm line {number}: negative value: {line!r}")
        segments.append(
            SysvSegment(
                key=row["key"],
                shmid=row["shmid"],
                size=row["size"],
                cpid=row["cpid"],
                lpid=row["lpid"],
                nattch=row["nattch"],
                uid=row["uid"],
                rss_bytes=row["rss"],
                swap_bytes=row["swap"],
            )
        )
    return segments


def read_segments(paths: HostPaths) -> list[SysvSegment]:
    """Segments of this thread's IPC namespace."""
    return parse_sysvipc_shm(read_proc_text(str(paths.proc("sysvipc", "shm"))))


_libc = ctypes.CDLL(None, use_errno=True)


def read_segments_in_namespace_of(paths: HostPaths, pid: int) -> list[SysvSegment]:
    """Segments of the IPC namespace of `pid`, read from a thread that joins it."""
    ns_fd = os.open(paths.proc(pid, "ns", "ipc"), os.O_RDONLY | os.O_CLOEXEC)
    result: list[SysvSegment] = []
    failure: list[BaseException] = []

    def join_and_read() -> None:
        try:
            if _libc.setns(ns_fd, CLONE_NEWIPC) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into the IPC namespace of pid {pid}: {os.strerror(err)}")
            result.extend(read_segments(paths))
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    try:
        thread = threading.Thread(target=join_and_read, name=f"sysvipc-{pid}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(ns_fd)
    if failure:
        raise failure[0]
    return result
