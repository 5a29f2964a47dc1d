"""tmpfs size limits: find the mounts a policy item names, and resize them by remount.

Which mount namespace: `find_targets(..., namespace_pid=None)` means the namespace that
`HostPaths.host_root` shows. With host root `/` (standalone) that is our own: we read
`<proc>/self/mountinfo` and act on the mount point itself. With host root
`<proc>/<pid>/root` (the agent in a pod: `/proc/1/root`) it is that pid's: we read
`<proc>/<pid>/mountinfo` and act through the host root. Any other host root is an error,
since no mount table would describe it. With `namespace_pid` we read that process's
mountinfo and act through `<proc>/<pid>/root/<mount point>`, which fspick accepts
without setns (docs/kernel-facts.md#remount).

Before acting, the mount point is opened (O_PATH, no symlink at the end) and every check
and the remount go through that fd, so they all see one object. It must be on the
superblock whose st_dev mountinfo showed as tmpfs (which also excludes devtmpfs: it shares
tmpfs's f_type but keeps its st_dev for life) and have f_type TMPFS_MAGIC; fspick itself
accepts only a mount root. A mount that vanished, or was replaced by another filesystem,
is NotFound and not touched. (A new tmpfs that reuses the freed st_dev, as the kernel
does at once, is acted on: it is a tmpfs mounted at the named path, checked like any.)

The kernel's rules this follows (mm/shmem.c; docs/kernel-facts.md#remount): a size
below current use is refused; a tmpfs made unlimited (size=0) can never be limited
again; size=0 is accepted and irreversible, so it is never sent.
"""

from __future__ import annotations

import errno
import fnmatch
import os
from collections import defaultdict
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path, PurePosixPath

from nodemem.host.mounts import PATH_ERRORS, TMPFS_MAGIC, Mount, dev_string, parse_mountinfo
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import read_proc_text, read_text
from nodemem.host.remount import RemountError, reconfigure_tmpfs
from nodemem.host.statfs import statfs, walk_usage

_GLOB_CHARACTERS = frozenset("*?[")


class LimitState(StrEnum):
    APPLIED = "Applied"
    UNCHANGED = "Unchanged"
    PLANNED = "Planned"  # dry run: this change would be made
    REFUSED = "Refused"
    NOT_TMPFS = "NotTmpfs"
    NOT_FOUND = "NotFound"
    FAILED = "Failed"
    # Another item covering the same mount wins (priority, then policy name, then position):
    # informational, never a failure.
    OVERRIDDEN = "Overridden"
    # Undo (policy.undo): no item applies to the mount any more and its original size and
    # nr_inodes were written back, or the kernel refused them (kept, retried).
    RESTORED = "Restored"
    RESTORE_REFUSED = "RestoreRefused"


@dataclass(frozen=True)
class Target:
    """A mount point a pattern named, and where this process reaches it."""

    mount_point: str  # as the mount namespace sees it
    path: Path  # where this process reaches it (through the host root or /proc/PID/root)
    mount: Mount | None  # the top-most mount there; None: not a mount point
    namespace_pid: int | None  # None: the host root's namespace


@dataclass(frozen=True)
class LimitResult:
    """What apply_limit found and did for one mount. Sizes in bytes, page-rounded."""

    path: str  # the mount point, as its namespace sees it
    state: LimitState
    message: str
    size_before: int | None = None
    size_after: int | None = None
    used_bytes: int | None = None
    desired_bytes: int | None = None  # the limit aimed at (raised by headroom if it says so)
    inodes_before: int | None = None
    inodes_after: int | None = None
    inodes_used: int | None = None


def find_targets(paths: HostPaths, pattern: str, namespace_pid: int | None = None) -> list[Target]:
    """The mount points `pattern` names in one mount namespace, sorted by mount point.

    `pattern` is an absolute path or a glob (fnmatch per path component: `*` never
    crosses `/`). An exact path always gives one target, with `mount=None` when it is not
    a mount point; a glob gives only its matching mount points, whatever their fstype
    (apply_limit reports the non-tmpfs ones as NotTmpfs), and none when nothing matches.
    Raises ProcessGone / ProcessUnreadable when the namespace's process cannot be read.
    """
    if not pattern.startswith("/"):
        raise ValueError(f"not an absolute path or glob: {pattern!r}")
    pid = namespace_pid if namespace_pid is not None else _host_root_pid(paths)
    if pid is None:
        text = read_proc_text(str(paths.proc("self", "mountinfo")), PATH_ERRORS)
    else:
        text = read_text(paths, pid, "mountinfo", PATH_ERRORS)
    tops = _top_mounts(parse_mountinfo(text))

    def target(mount_point: str, mount: Mount | None) -> Target:
        path = paths.host(mount_point) if pid is None else paths.in_namespace_of(pid, mount_point)
        return Target(mount_point, path, mount, namespace_pid)

    if _GLOB_CHARACTERS.isdisjoint(pattern):
        exact = os.path.normpath(pattern)
        return [target(exact, tops.get(exact))]
    wanted = PurePosixPath(pattern).parts
    return [
        target(point, mount)
        for point, mount in sorted(tops.items())
        if _glob_matches(wanted, PurePosixPath(point).parts)
    ]


def namespace_mounts(paths: HostPaths, namespace_pid: int | None = None) -> list[Mount]:
    """The mount table find_targets reads: `namespace_pid`'s, or (None) the host root's."""
    pid = namespace_pid if namespace_pid is not None else _host_root_pid(paths)
    if pid is None:
        return parse_mountinfo(read_proc_text(str(paths.proc("self", "mountinfo")), PATH_ERRORS))
    return parse_mountinfo(read_text(paths, pid, "mountinfo", PATH_ERRORS))


def host_namespace_pid(paths: HostPaths) -> int | None:
    """The pid whose mount namespace the host root shows; None: our own (host root /)."""
    return _host_root_pid(paths)


def top_mount_at(mounts: list[Mount], mount_point: str) -> Mount | None:
    """The visible mount at `mount_point` (see _top_mounts), None when it is not one."""
    return _top_mounts([mount for mount in mounts if mount.mount_point == mount_point]).get(
        mount_point
    )


def apply_limit(
    target: Target,
    size_bytes: int,
    nr_inodes: int | None = None,
    headroom_bytes: int | None = None,
    dry_run: bool = False,
) -> LimitResult:
    """Limit the tmpfs at `target` to `size_bytes` (and `nr_inodes`); never raises OSError.

    Never shrinks below current use: without `headroom_bytes` that is Refused; with it the
    limit becomes used + headroom, but never above the current size, so that a growing
    tmpfs cannot push its own limit up round after round. Values are compared as the
    kernel stores them (size in pages), so applying the same limit again is Unchanged.
    Raises ValueError only for a negative headroom.
    """
    if headroom_bytes is not None and headroom_bytes < 0:
        raise ValueError(f"negative headroom: {headroom_bytes}")
    point = target.mount_point
    mount = target.mount
    if mount is None:
        return LimitResult(point, LimitState.NOT_FOUND, f"{point} is not a mount point")
    if mount.fstype != "tmpfs":
        return LimitResult(
            point, LimitState.NOT_TMPFS, f"{point} is {mount.fstype}, not tmpfs: not touched"
        )
    if size_bytes < 1 or (nr_inodes is not None and nr_inodes < 1):
        return LimitResult(
            point,
            LimitState.REFUSED,
            "size and nrInodes must be positive: 0 would make the tmpfs unlimited, and it "
            "could never be limited again",
        )
    try:
        fd = os.open(target.path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return LimitResult(point, LimitState.NOT_FOUND, f"{point} is gone: {exc.strerror}")
        return LimitResult(point, LimitState.FAILED, f"cannot open {target.path}: {exc}")
    try:
        request = _Request(size_bytes, nr_inodes, headroom_bytes, dry_run)
        return _apply_on_fd(fd, point, mount, request)
    except OSError as exc:
        return LimitResult(point, LimitState.FAILED, str(exc))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Usage:
    """A tmpfs superblock's limits and use, from statvfs. Blocks are pages."""

    page: int
    blocks: int  # 0: unlimited
    used_blocks: int
    inodes: int  # 0: unlimited
    used_inodes: int

    @classmethod
    def of(cls, fd: int) -> _Usage:
        stat = os.fstatvfs(fd)
        return cls(
            page=stat.f_frsize or stat.f_bsize,
            blocks=stat.f_blocks,
            used_blocks=stat.f_blocks - stat.f_bfree,
            inodes=stat.f_files,
            used_inodes=stat.f_files - stat.f_ffree,
        )


@dataclass(frozen=True)
class _Request:
    size_bytes: int
    nr_inodes: int | None
    headroom_bytes: int | None
    dry_run: bool


def _apply_on_fd(fd: int, point: str, mount: Mount, request: _Request) -> LimitResult:
    dev = os.fstat(fd).st_dev
    if dev != mount.dev:
        return LimitResult(
            point,
            LimitState.NOT_FOUND,
            f"{point} no longer shows the tmpfs seen in mountinfo (dev {dev_string(mount.dev)},"
            f" now {dev_string(dev)}): not touched",
        )
    magic = statfs(fd).fs_type
    if magic != TMPFS_MAGIC:
        return LimitResult(
            point, LimitState.NOT_TMPFS, f"{point} has f_type {magic:#x}, not tmpfs: not touched"
        )
    before = _Usage.of(fd)
    page = before.page
    nr_inodes = request.nr_inodes
    asked_blocks = -(-request.size_bytes // page)
    found = LimitResult(
        point,
        LimitState.UNCHANGED,
        "",
        size_before=before.blocks * page,
        size_after=before.blocks * page,
        # An unlimited tmpfs has no blocks to count in statfs: its files tell its use.
        used_bytes=before.used_blocks * page
        if before.blocks
        else walk_usage(f"/proc/self/fd/{fd}", dev),
        desired_bytes=asked_blocks * page,
        inodes_before=before.inodes,
        inodes_after=before.inodes,
        inodes_used=before.used_inodes,
    )
    refusal = _refusal(before, asked_blocks, request)
    if refusal:
        return replace(found, state=LimitState.REFUSED, message=refusal)

    target_blocks = asked_blocks
    note = ""
    if before.used_blocks > asked_blocks:  # _refusal let it through: headroom is given
        headroom = request.headroom_bytes or 0
        with_headroom = -(-(before.used_blocks * page + headroom) // page)
        target_blocks = min(before.blocks, with_headroom)
        found = replace(found, desired_bytes=target_blocks * page)
        note = (
            f"used {_format_bytes(before.used_blocks * page)} exceeds asked "
            f"{_format_bytes(request.size_bytes)}: limit is used + headroom "
            f"({_format_bytes(headroom)}), at most the current size; "
        )

    options: dict[str, str] = {}
    if target_blocks != before.blocks:
        options["size"] = str(target_blocks * page)
    if nr_inodes is not None and nr_inodes != before.inodes:
        options["nr_inodes"] = str(nr_inodes)
    change = _describe_change(before, target_blocks, nr_inodes)
    if not options:
        return replace(found, state=LimitState.UNCHANGED, message=f"{note}already {change}")
    if request.dry_run:
        return replace(found, state=LimitState.PLANNED, message=f"{note}would set {change}")

    try:
        reconfigure_tmpfs(fd, options)
    except RemountError as exc:
        state = LimitState.REFUSED if exc.errno == errno.EINVAL else LimitState.FAILED
        return replace(
            found, state=state, message=f"{note}the kernel refused {change}: {exc.reason}"
        )

    after = _Usage.of(fd)
    found = replace(found, size_after=after.blocks * page, inodes_after=after.inodes)
    if after.blocks != target_blocks or (nr_inodes is not None and after.inodes != nr_inodes):
        return replace(
            found,
            state=LimitState.FAILED,
            message=f"remounted for {change}, but the kernel now reports size "
            f"{_format_bytes(after.blocks * page)}, nr_inodes {after.inodes}",
        )
    return replace(found, state=LimitState.APPLIED, message=f"{note}set {change}")


def _refusal(before: _Usage, asked_blocks: int, request: _Request) -> str | None:
    """Why the kernel would refuse this (or we must not ask), checked before asking it."""
    if before.blocks == 0:
        return (
            "unlimited tmpfs (size=0) can never be limited again: the kernel refuses "
            "(Cannot retroactively limit size)"
        )
    nr_inodes = request.nr_inodes
    if nr_inodes is not None and before.inodes == 0:
        return (
            "unlimited inodes (nr_inodes=0) can never be limited again: the kernel refuses "
            "(Cannot retroactively limit inodes)"
        )
    if nr_inodes is not None and nr_inodes < before.used_inodes:
        return (
            f"would leave fewer inodes than in use (used {before.used_inodes}, asked {nr_inodes})"
        )
    if before.used_blocks > asked_blocks and request.headroom_bytes is None:
        used = _format_bytes(before.used_blocks * before.page)
        asked = _format_bytes(request.size_bytes)
        return f"would shrink below current use (used {used}, asked {asked})"
    return None


def _host_root_pid(paths: HostPaths) -> int | None:
    """None when the host root is `/` (our own namespace), else the pid of `<proc>/<pid>/root`."""
    root = paths.host_root
    if root == Path("/"):
        return None
    if root.name == "root" and root.parent.parent == paths.proc_root and root.parent.name.isdigit():
        return int(root.parent.name)
    raise ValueError(
        f"host root {root} is neither / nor {paths.proc_root}/<pid>/root: no mountinfo "
        "describes it; pass namespace_pid"
    )


def _top_mounts(mounts: list[Mount]) -> dict[str, Mount]:
    """The visible mount at each mount point.

    Mounts stacked at one point are chained: each one's parent is the one it covers, so
    the top is the one that is no other's parent. Order in mountinfo decides only the
    (unexpected) rest.
    """
    stacks: defaultdict[str, list[Mount]] = defaultdict(list)
    for mount in mounts:
        stacks[mount.mount_point].append(mount)
    tops: dict[str, Mount] = {}
    for point, stack in stacks.items():
        covered = {mount.parent_id for mount in stack}
        uncovered = [mount for mount in stack if mount.mount_id not in covered]
        tops[point] = (uncovered or stack)[-1]
    return tops


def _glob_matches(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    return len(pattern) == len(path) and all(
        fnmatch.fnmatchcase(part, wanted) for wanted, part in zip(pattern, path, strict=True)
    )


def _describe_change(before: _Usage, target_blocks: int, nr_inodes: int | None) -> str:
    page = before.page
    parts = [f"size {_format_bytes(before.blocks * page)}"]
    if target_blocks != before.blocks:
        parts[0] += f" -> {_format_bytes(target_blocks * page)}"
    if nr_inodes is not None:
        parts.append(f"nr_inodes {before.inodes}")
        if nr_inodes != before.inodes:
            parts[1] += f" -> {nr_inodes}"
    return ", ".join(parts)


def _format_bytes(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.4g} {unit}"
    return f"{count} B"
