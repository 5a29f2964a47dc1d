"""statx(2) for the birth time (btime), which os.stat does not give on Linux (Python 3.11)."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

AT_SYMLINK_NOFOLLOW = 0x100
STATX_INO = 0x100
STATX_BTIME = 0x800


class _Timestamp(ctypes.Structure):
    _fields_ = (
        ("tv_sec", ctypes.c_int64),
        ("tv_nsec", ctypes.c_uint32),
        ("_reserved", ctypes.c_int32),
    )


class _Statx(ctypes.Structure):
    # struct statx from linux/stat.h: 256 bytes, the same on every architecture.
    _fields_ = (
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("_spare0", ctypes.c_uint16),
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _Timestamp),
        ("stx_btime", _Timestamp),
        ("stx_ctime", _Timestamp),
        ("stx_mtime", _Timestamp),
        ("stx_rdev_major", ctypes.c_uint32),
        ("stx_rdev_minor", ctypes.c_uint32),
        ("stx_dev_major", ctypes.c_uint32),
        ("stx_dev_minor", ctypes.c_uint32),
        ("_spare", ctypes.c_uint64 * 14),
    )


_statx = getattr(_libc, "statx", None)  # glibc >= 2.28
if _statx is not None:
    _statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)
    _statx.restype = ctypes.c_int


class BirthTime:
    """Birth times of entries relative to a directory fd, symlinks not followed.

    One reusable buffer: not thread-safe, meant for one walk.
    """

    def __init__(self) -> None:
        self._buf = _Statx()
        self._ref = ctypes.byref(self._buf)

    def ns(self, dir_fd: int, name: str) -> tuple[int, int | None]:
        """(st_ino, btime in ns), btime None when the filesystem does not report one.

        The inode lets the caller check it is the entry it stat'ed before.
        """
        if _statx is None:
            raise OSError(0, "statx(2) is not available in this C library")
        result = _statx(
            dir_fd, os.fsencode(name), AT_SYMLINK_NOFOLLOW, STATX_BTIME | STATX_INO, self._ref
        )
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), name)
        buf = self._buf
        if not buf.stx_mask & STATX_BTIME:
            return buf.stx_ino, None
        return buf.stx_ino, buf.stx_btime.tv_sec * 1_000_000_000 + buf.stx_btime.tv_nsec
