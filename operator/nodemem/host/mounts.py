"""Mount tables: /proc/PID/mountinfo parsing and the tmpfs superblocks they show."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from nodemem.host.procfs import read_proc_text

# Mount points are decoded with surrogate escapes: a path that is not UTF-8 still
# works in statfs, open and remount (reports make it printable).
PATH_ERRORS = "surrogateescape"

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
SHMEM_FSTYPES = frozenset({"tmpfs", "devtmpfs"})

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    r"""Undo the kernel's octal escaping of space, tab, newline and backslash (`\040`)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo."""

    mount_id: int
    parent_id: int
    dev: int  # st_dev of the superblock, os.makedev(major, minor)
    root: str  # path inside the filesystem that is mounted here
    mount_point: str  # as seen in the reader's namespace
    mount_options: str  # per-mount flags (rw, nosuid, ...)
    fstype: str
    source: str
    super_options: str  # superblock options (size=, nr_inodes=, ...)

    @property
    def is_shmem(self) -> bool:
        return self.fstype in SHMEM_FSTYPES

    def super_option(self, name: str) -> str | None:
        for option in self.super_options.split(","):
            key, _, value = option.partition("=")
            if key == name:
                return value
        return None


class MountinfoError(ValueError):
    pass


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse mountinfo text; a malformed line raises MountinfoError naming the line."""
    mounts: list[Mount] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ")
        rest = tail.split(" ")
        if not sep or len(fields) < 6 or len(rest) < 3:
            raise MountinfoError(f"mountinfo line {number}: malformed: {line!r}")
        try:
            major, minor = (int(part) for part in fields[2].split(":"))
            mount = Mount(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                dev=os.makedev(major, minor),
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                mount_options=fields[5],
                fstype=rest[0],
                source=unescape(rest[1]),
                super_options=rest[2],
            )
        except (ValueError, OverflowError) as exc:
            raise MountinfoError(f"mountinfo line {number}: malformed ({exc}): {line!r}") from None
        if not mount.mount_point.startswith("/") or mount.mount_id < 0 or mount.parent_id < 0:
            raise MountinfoError(f"mountinfo line {number}: malformed: {line!r}")
        mounts.append(mount)
    return mounts


def dev_string(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


def devtmpfs_devs(proc_root: str) -> set[int]:
    """st_dev of the devtmpfs superblock (one per kernel), from any readable mount table.

    devtmpfs is shmem too and reports TMPFS_MAGIC from statfs: only the mount table tells
    it apart, and nothing in /dev is ever a cleanup or limit target.
    """
    devs: set[int] = set()
    for reader in ("self", "1"):
        try:
            text = read_proc_text(f"{proc_root}/{reader}/mountinfo", PATH_ERRORS)
            mounts = parse_mountinfo(text)
        except (OSError, MountinfoError):
            continue
        devs.update(mount.dev for mount in mounts if mount.fstype == "devtmpfs")
    return devs
