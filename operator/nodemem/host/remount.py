"""Changing a tmpfs superblock in place (size=, nr_inodes=): the remount syscalls.

Preferred is the new mount API: fspick + fsconfig(FSCONFIG_CMD_RECONFIGURE). It changes
superblock parameters only, never the per-mount flags (nosuid, nodev, noexec, ro); it
works on a mount of another mount namespace reached through /proc/PID/root; and the
fs-context fd hands back the kernel's reason for a refusal. When fspick is missing
(ENOSYS: kernel < 5.2, or a seccomp filter) the fallback is mount(2) with MS_REMOUNT,
which rewrites the per-mount flags from its arguments, so the current ones are passed
back; its refusals are a bare EINVAL. See docs/kernel-facts.md#remount.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
from collections.abc import Mapping
from typing import NoReturn

# Since Linux 5.1 new syscalls have one number on every architecture but alpha and mips:
# fsconfig 431, fspick 433 (x86_64 unistd_64.h, i386 unistd_32.h, and asm-generic/unistd.h,
# which aarch64, riscv and loongarch use). Elsewhere we do not guess: fspick counts as missing.
_UNIFIED_SYSCALL_TABLE = frozenset(
    {"x86_64", "i386", "i686", "aarch64", "arm64", "armv7l", "armv8l", "riscv64",
     "loongarch64", "ppc64le", "ppc64", "s390x"}
)  # fmt: skip
_NR_FSCONFIG = 431
_NR_FSPICK = 433

_AT_FDCWD = -100
_FSPICK_CLOEXEC = 0x1
_FSPICK_EMPTY_PATH = 0x8
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_RECONFIGURE = 7

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_SYNCHRONOUS = 16
_MS_REMOUNT = 32
_MS_MANDLOCK = 64
_MS_NOSYMFOLLOW = 256
_ST_NOSYMFOLLOW = 0x2000  # not in Python 3.11's os module

# statvfs f_flag -> mount(2) flag. Atime flags are left out on purpose: with none given the
# kernel keeps the mount's atime flags as they are, while passing e.g. MS_NODIRATIME alone
# would turn strictatime into the relatime default.
_FLAGS_KEPT_BY_MOUNT2 = (
    (os.ST_NOSUID, _MS_NOSUID),
    (os.ST_NODEV, _MS_NODEV),
    (os.ST_NOEXEC, _MS_NOEXEC),
    (os.ST_SYNCHRONOUS, _MS_SYNCHRONOUS),
    (os.ST_MANDLOCK, _MS_MANDLOCK),
    (_ST_NOSYMFOLLOW, _MS_NOSYMFOLLOW),
)

# Values the kernel's memparse() reads as a positive number: no 0 (unlimited, for good),
# no leading zero (octal) and no hex, so what we check is what the kernel gets.
_POSITIVE_AMOUNT = re.compile(r"[1-9][0-9]*[kKmMgGtTpPeE%]?")
_LIMIT_OPTIONS = ("size", "nr_inodes")
_OPTION_KEY = re.compile(r"[a-z0-9_]+")

_MOUNT2_EINVAL_REASON = (
    "EINVAL from mount(2), which gives no reason (the kernel logs it to dmesg); for tmpfs "
    "it most likely means the new size or nr_inodes is below current use, or the tmpfs is "
    "unlimited (size=0 / nr_inodes=0) and can never be limited again, or the path is not a "
    "mount point of this mount namespace"
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
# struct statfs starts with f_type: a long (__fsword_t) except on s390x, where it is an int.


class RemountError(OSError):
    """The kernel refused the new superblock options.

    `reason` is the kernel's own text when `from_kernel` (e.g. "tmpfs: Too small a size
    for current use"), else what the bare errno most likely means.
    """

    def __init__(self, error: int, reason: str, path: str, *, from_kernel: bool) -> None:
        super().__init__(error, reason, path)
        self.reason = reason
        self.from_kernel = from_kernel


def reconfigure_tmpfs(
    path: str | int, options: Mapping[str, str], *, use_mount_api: bool = True
) -> None:
    """Set superblock `options` (e.g. {"size": "64m"}) of the tmpfs mounted at `path`.

    `path` is a mount point, or an open fd of one (O_PATH is enough). Only the options
    given change. `use_mount_api=False` forces the mount(2) fallback. A `size` or
    `nr_inodes` of 0 (unlimited, irreversibly) or any value that is not a plain positive
    amount raises ValueError before the kernel is asked. Raises RemountError when the
    kernel refuses the options, OSError for anything else.
    """
    _check_options(options)
    if use_mount_api and _reconfigure_with_fspick(path, options):
        return
    _remount_with_mount2(path, options)


def _check_options(options: Mapping[str, str]) -> None:
    if not options:
        raise ValueError("no options to set")
    for key, value in options.items():
        # Keys and values end up in a comma-separated mount(2) data string in the fallback.
        if not _OPTION_KEY.fullmatch(key) or "," in value or "\0" in value:
            raise ValueError(f"not a tmpfs option: {key}={value!r}")
        if key in _LIMIT_OPTIONS and not _POSITIVE_AMOUNT.fullmatch(value):
            raise ValueError(
                f"{key}={value!r} refused: only a positive amount; 0 would make the tmpfs "
                "unlimited, and it could never be limited again"
            )


def _reconfigure_with_fspick(path: str | int, options: Mapping[str, str]) -> bool:
    """True when done; False when the new mount API is missing (ENOSYS)."""
    if platform.machine() not in _UNIFIED_SYSCALL_TABLE:
        return False
    if isinstance(path, int):
        pick = (path, b"", _FSPICK_CLOEXEC | _FSPICK_EMPTY_PATH)
    else:
        pick = (_AT_FDCWD, os.fsencode(path), _FSPICK_CLOEXEC)
    try:
        context_fd = _syscall(_NR_FSPICK, *pick)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return False
        raise OSError(exc.errno, f"fspick: {exc.strerror}", _describe(path)) from None
    try:
        for key, value in options.items():
            _fsconfig(context_fd, path, _FSCONFIG_SET_STRING, key.encode(), value.encode())
        _fsconfig(context_fd, path, _FSCONFIG_CMD_RECONFIGURE, None, None)
    finally:
        os.close(context_fd)
    return True


def _fsconfig(
    context_fd: int, path: str | int, command: int, key: bytes | None, value: bytes | None
) -> None:
    try:
        _syscall(_NR_FSCONFIG, context_fd, command, key, value, 0)
    except OSError as exc:
        error = exc.errno or errno.EINVAL
        messages = _read_context_log(context_fd)
        reason = "; ".join(messages) if messages else os.strerror(error)
        raise RemountError(error, reason, _describe(path), from_kernel=bool(messages)) from None


def _read_context_log(context_fd: int) -> list[str]:
    """The fs context's messages, errors first ("e "), without their one-letter prefix."""
    errors: list[str] = []
    others: list[str] = []
    while True:
        try:
            raw = os.read(context_fd, 4096)
        except OSError:  # ENODATA: the log is empty
            break
        if not raw:
            break
        line = raw.decode(errors="replace").rstrip("\n")
        kind, _, text = line.partition(" ")
        (errors if kind == "e" else others).append(text or line)
    return errors or others


def _remount_with_mount2(path: str | int, options: Mapping[str, str]) -> None:
    # An fd is reached through its /proc magic link, which mount(2) follows to the mount.
    target = f"/proc/self/fd/{path}" if isinstance(path, int) else path
    current = os.statvfs(path).f_flag
    if current & os.ST_RDONLY:
        # statvfs does not say whether the mount or the superblock is read-only; MS_RDONLY
        # would make the superblock (every mount of it) read-only, leaving it out would
        # make this mount writable. Neither is acceptable.
        raise OSError(
            errno.EOPNOTSUPP,
            "read-only mount: mount(2) cannot keep it read-only without making the whole "
            "superblock read-only (fspick is needed); not remounted",
            _describe(path),
        )
    flags = _MS_REMOUNT
    for st_flag, ms_flag in _FLAGS_KEPT_BY_MOUNT2:
        if current & st_flag:
            flags |= ms_flag
    data = ",".join(f"{key}={value}" for key, value in options.items()).encode()
    ctypes.set_errno(0)
    if _libc.mount(None, os.fsencode(target), None, flags, data) != 0:
        error = ctypes.get_errno()
        if error == errno.EINVAL:
            raise RemountError(error, _MOUNT2_EINVAL_REASON, _describe(path), from_kernel=False)
        raise OSError(error, f"mount(2): {os.strerror(error)}", _describe(path))


def _syscall(number: int, *args: int | bytes | None) -> int:
    # Every argument goes as a full machine word: syscall() reads longs from its varargs.
    words = [ctypes.c_long(arg) if isinstance(arg, int) else ctypes.c_char_p(arg) for arg in args]
    ctypes.set_errno(0)
    result = int(_libc.syscall(ctypes.c_long(number), *words))
    if result < 0:
        _raise_errno(None)
    return result


def _raise_errno(path: str | None) -> NoReturn:
    error = ctypes.get_errno()
    raise OSError(error, os.strerror(error), path)


def _describe(path: str | int) -> str:
    return f"fd {path}" if isinstance(path, int) else path
