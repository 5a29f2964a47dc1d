"""statfs(2) with the filesystem type, which os.statvfs does not give; a tmpfs's use
when statfs cannot tell it (an unlimited one reports 0 blocks)."""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux (x86_64 and aarch64 share this layout).
    _fields_ = (
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    )


@dataclass(frozen=True)
class FsStat:
    fs_type: int
    block_size: int
    blocks: int
    blocks_free: int
    files: int
    files_free: int

    @property
    def size_bytes(self) -> int:
        return self.blocks * self.block_size

    @property
    def used_bytes(self) -> int:
        return (self.blocks - self.blocks_free) * self.block_size


def statfs(target: str | os.PathLike[str] | int) -> FsStat:
    """statfs(2) of a path (follows /proc magic links, so works on /proc/PID/fd/N), or
    fstatfs(2) of an open fd."""
    buf = _Statfs()
    if isinstance(target, int):
        result = _libc.fstatfs(target, ctypes.byref(buf))
    else:
        result = _libc.statfs(os.fsencode(target), ctypes.byref(buf))
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))
    frsize = buf.f_frsize or buf.f_bsize
    return FsStat(
        fs_type=buf.f_type & 0xFFFFFFFF,
        block_size=frsize,
        blocks=buf.f_blocks,
        blocks_free=buf.f_bfree,
        files=buf.f_files,
        files_free=buf.f_ffree,
    )


def walk_usage(path: str, dev: int) -> int:
    """Allocated bytes of the files under `path` on superblock `dev` (hard links once)."""
    total = 0
    seen: set[int] = set()
    stack = [path]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != dev or st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            total += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return total
