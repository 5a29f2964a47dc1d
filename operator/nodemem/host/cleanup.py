"""Safe removal of files inside tmpfs mounts: globs, age, usage watermarks, held-open files.

Safety is the feature:

- Only tmpfs: a pattern whose literal base directory is not on a tmpfs (fstatfs f_type, and
  not the devtmpfs of /dev, which reports the same magic) is skipped and reported (pattern
  state Skipped, naming the filesystem); nothing below it is touched. So is a base that does
  not exist or is not a directory. The base is never `/` itself (refused as unsafe).
- One mount only: the walk never enters a directory on another mount (mount id from fdinfo)
  or another superblock (st_dev): bind mounts and nested filesystems are left alone, and each
  pattern that wanted to enter one is reported Incomplete, naming the mount point.
- No symlink is followed below the base: a matching symlink is removed as a link, its target is
  never touched. In the literal base a symlink is followed only when it lives on a filesystem
  that is not tmpfs (host-owned links such as /var/run -> /run), and it is resolved inside the
  host root (absolute targets and `..` stay inside it, as in a chroot). A symlink on a tmpfs in
  the base is an error: whoever writes that tmpfs could aim the rule elsewhere.
- Every step goes through directory fds (openat with O_NOFOLLOW, fstatat, unlinkat): a path
  renamed or swapped during the run cannot redirect a removal. Each unlink directly follows a
  stat of that name through the same directory fd showing the inode selected: without a
  watermark the selecting stat itself, taken after the directory was listed and just before
  the unlink; with one (every candidate is selected first, then removed oldest first) the
  entry is stat'ed again at removal and must still be the inode the walk selected.
- A file that a process holds open is kept (removing it frees nothing) and reported.
- A directory on which a process holds a BSD flock lock is kept with everything below it, as
  systemd-tmpfiles does (tmpfiles.d(5)): the walk tries LOCK_EX|LOCK_NB when it enters a
  directory (a base too), never waits, releases at once, and reports the directory (locked).

Pattern semantics: absolute host paths; each `/`-separated component is an fnmatch pattern
matched against one name (`*` never crosses `/`, and matches names starting with `.`); a
component `**` matches any number of directories (`dir/**` = every file below dir). The final
component matches files and symlinks only: a directory it matches is neither removed nor
entered. Only regular files and symlinks are removed; sockets, fifos and devices are ignored.
`exclude` patterns without `/` match an entry's name anywhere; with `/` they match its full
path: absolute ones as written, relative ones joined to the literal base of each of the rule's
paths (`sub/keep.log` with `/m/logs/**` is `/m/logs/sub/keep.log`). fnmatch: here `*` may cross
`/`. Paths are compared with the symlinks of every literal directory part resolved in the host
root (the pattern's base and the exclude's own literal prefix; in an exclude even a symlink on
a tmpfs, since that can only keep more), so an exclude may name a directory through a symlink
(`/var/run/x`) or by its real path (`/run/x`) alike. An excluded directory is not entered.

Age: `age` names the timestamps that must all be older than older_than (the newest of them
orders a watermark's removals). btime, the birth time, comes from statx(2); where the
filesystem does not report it (stx_mask without STATX_BTIME) the file is never old, so a btime
rule removes nothing there, for lack of data, and counts those files in its errors.

Empty directories (only with remove_empty_dirs): a directory the walk entered below a base
(never a base) that is empty after the cleanup is removed, deepest first; with older_than set
its mtime as seen by the walk must also be older than the threshold, so that a directory an
application has just created or changed is left alone.

Watermarks: when a mount's usage (statvfs) is above when_usage_above, the oldest candidates go
first until usage is at or below target_usage; a mount without a size limit reports no usage,
so a watermark rule leaves it alone and says so. Patterns on the same superblock share one
watermark. Hard links are counted per name (st_blocks of the inode for each).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import re
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from operator import attrgetter

from nodemem.host.mounts import (
    PATH_ERRORS,
    TMPFS_MAGIC,
    MountinfoError,
    devtmpfs_devs,
    parse_mountinfo,
)
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import Holder, read_proc_text
from nodemem.host.statfs import statfs
from nodemem.host.statx import BirthTime

AGE_FIELDS = ("atime", "mtime", "ctime", "btime")
REMOVED_REPORT_LIMIT = 100  # real runs list the first paths removed, for the report
MAX_DEPTH = 100  # below a base; deeper trees are reported, not walked (fd and stack bounds)

_MAX_SYMLINKS = 40  # as the kernel's MAXSYMLINKS
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GLOB_CHARS = frozenset("*?[")
_RECURSIVE = "**"
_CACHED_DIR_FDS = 64
_CROSSINGS_LISTED = 3  # other mount points named per pattern


@dataclass(frozen=True)
class RemovedFile:
    path: str
    bytes: int


@dataclass(frozen=True)
class HeldOpenFile:
    path: str
    bytes: int
    holders: tuple[Holder, ...]


class PatternState(StrEnum):
    WALKED = "Walked"  # the base is a tmpfs directory and the walk stayed on its mount
    SKIPPED = "Skipped"  # nothing to do: the base does not exist, is no directory, not tmpfs
    INCOMPLETE = "Incomplete"  # walked, but directories it matched are other mounts: not entered
    FAILED = "Failed"  # the base could not be opened safely (a symlink on a tmpfs, EACCES)


class CleanupState(StrEnum):
    COMPLETED = "Completed"
    INCOMPLETE = "Incomplete"  # a pattern not Walked, or per-file errors
    FAILED = "Failed"  # the run raised, or a pattern Failed


@dataclass(frozen=True)
class PatternResult:
    pattern: str
    state: PatternState
    message: str = ""


@dataclass(frozen=True)
class CleanupResult:
    """What one rule did; in a dry run the counts are what it would have done.

    bytes are st_blocks * 512: the memory a removal frees.
    """

    name: str
    dry_run: bool
    files_removed: int
    bytes_removed: int
    dirs_removed: int
    removed: list[RemovedFile]  # real run: the first REMOVED_REPORT_LIMIT files removed
    would_remove: list[RemovedFile]  # dry run: every file it would remove, in order
    held_open: list[HeldOpenFile]
    errors: list[str]
    skipped_not_tmpfs: list[str]  # base directories of patterns that are not on a tmpfs
    patterns: list[PatternResult] = field(default_factory=list)  # one per spec path, in order
    failure: str = ""  # the run itself failed: nothing was done
    locked: list[str] = field(default_factory=list)  # directories kept whole: flock held on them

    @classmethod
    def failed(cls, name: str, *, dry_run: bool, message: str) -> CleanupResult:
        return cls(name, dry_run, 0, 0, 0, [], [], [], [], [], failure=message)

    @property
    def state(self) -> CleanupState:
        states = {p.state for p in self.patterns}
        if self.failure or PatternState.FAILED in states:
            return CleanupState.FAILED
        if self.errors or states - {PatternState.WALKED}:
            return CleanupState.INCOMPLETE
        return CleanupState.COMPLETED


@dataclass(frozen=True)
class _Component:
    """One `/`-separated part of a pattern: a literal name, an fnmatch pattern or `**`."""

    text: str
    regex: re.Pattern[str] | None

    @classmethod
    def parse(cls, text: str) -> _Component:
        if text == _RECURSIVE or not _has_glob(text):
            return cls(text, None)
        return cls(text, re.compile(fnmatch.translate(text)))

    @property
    def recursive(self) -> bool:
        return self.text == _RECURSIVE

    def matches(self, name: str) -> bool:
        if self.regex is None:
            return name == self.text
        return self.regex.match(name) is not None


@dataclass(frozen=True)
class _Pattern:
    text: str
    base: tuple[str, ...]  # literal directory components
    components: tuple[_Component, ...]  # the rest; never ends in `**`

    @property
    def base_path(self) -> str:
        return "/" + "/".join(self.base)


def _has_glob(text: str) -> bool:
    return not _GLOB_CHARS.isdisjoint(text)


def _parse_pattern(text: str) -> _Pattern:
    """Split an absolute pattern into its literal base and glob components; ValueError if unsafe."""
    where = f"cleanup path {text!r}"
    if not text.startswith("/"):
        raise ValueError(f"{where}: must be an absolute host path")
    if "\0" in text:
        raise ValueError(f"{where}: contains NUL")
    if text.endswith("/"):
        raise ValueError(f"{where}: names files; use {text}* or {text}** for a directory's files")
    parts: list[str] = []
    for part in text.split("/"):
        if part in (".", ".."):
            raise ValueError(f"{where}: '.' and '..' are not allowed")
        if part and not (part == _RECURSIVE and parts and parts[-1] == _RECURSIVE):
            parts.append(part)
    if parts[-1] == _RECURSIVE:
        parts.append("*")  # `dir/**` means every file below dir
    literal = 0
    while literal < len(parts) - 1 and not _has_glob(parts[literal]):
        literal += 1
    if literal == 0:  # `/x`, `/*`, `/**`: the walk would start at the host root
        raise ValueError(f"{where}: its literal directory is /; name a directory on the tmpfs")
    return _Pattern(
        text=text,
        base=tuple(parts[:literal]),
        components=tuple(_Component.parse(part) for part in parts[literal:]),
    )


def _compile_name_excludes(patterns: Sequence[str]) -> re.Pattern[str] | None:
    chosen = [fnmatch.translate(p) for p in patterns if "/" not in p]
    return re.compile("|".join(chosen)) if chosen else None


def _literal_prefix(parts: Sequence[str]) -> int:
    """How many leading directory components of an exclude are literal (no glob)."""
    literal = 0
    while literal < len(parts) - 1 and not _has_glob(parts[literal]):
        literal += 1
    return literal


def _joined(directory: str, rest: str) -> str:
    """An exclude regex: a literal directory (escaped, any characters) then an fnmatch glob."""
    prefix = directory if directory.endswith("/") else f"{directory}/"
    return re.escape(prefix) + fnmatch.translate(rest)


@dataclass(frozen=True)
class CleanupSpec:
    """One cleanup rule, in host terms (the api layer converts its model to this).

    `paths` are absolute host globs (see the module doc); `..`, `.` and relative patterns raise
    ValueError. A file is old when every `age` timestamp (atime, mtime, ctime, btime) is older
    than now - older_than. A rule without older_than and watermarks removes every matching file.
    """

    name: str
    paths: tuple[str, ...]
    older_than: timedelta | None = None
    age: tuple[str, ...] = ("mtime",)
    when_usage_above: float | None = None
    target_usage: float | None = None  # default: when_usage_above
    exclude: tuple[str, ...] = ()
    remove_empty_dirs: bool = False
    _patterns: tuple[_Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("paths", "age", "exclude"):  # accept lists, keep the spec immutable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.name:
            raise ValueError("cleanup rule needs a name")
        if not self.paths:
            raise ValueError(f"cleanup rule {self.name!r}: no paths")
        object.__setattr__(self, "_patterns", tuple(_parse_pattern(p) for p in self.paths))
        if self.older_than is not None and self.older_than < timedelta(0):
            raise ValueError(f"cleanup rule {self.name!r}: older_than is negative")
        if not self.age or not set(self.age) <= set(AGE_FIELDS):
            raise ValueError(f"cleanup rule {self.name!r}: age must be a subset of {AGE_FIELDS}")
        for fraction in (self.when_usage_above, self.target_usage):
            if fraction is not None and not 0.0 <= fraction <= 1.0:
                raise ValueError(f"cleanup rule {self.name!r}: usage {fraction} is not in 0..1")
        if self.target_usage is not None:
            if self.when_usage_above is None:
                raise ValueError(f"cleanup rule {self.name!r}: target_usage needs when_usage_above")
            if self.target_usage > self.when_usage_above:
                raise ValueError(
                    f"cleanup rule {self.name!r}: target_usage is above when_usage_above"
                )
        if any(not pattern for pattern in self.exclude):
            raise ValueError(f"cleanup rule {self.name!r}: empty exclude pattern")


def run_cleanup(
    paths: HostPaths,
    spec: CleanupSpec,
    held_open: Mapping[tuple[int, int], Sequence[Holder]],
    *,
    dry_run: bool,
    now: float | None = None,
) -> CleanupResult:
    """Apply one rule once. Per-file problems become `errors`; this never raises for them.

    held_open maps (st_dev, st_ino) of files that processes hold open to their holders.
    A dry run selects exactly as a real run would (watermarks with the simulated freed bytes)
    and removes nothing.
    """
    return _Run(paths, spec, held_open, dry_run=dry_run, now=time.time() if now is None else now)()


def _is_tmpfs(fd: int) -> bool:
    """fstatfs(fd).f_type is tmpfs. (devtmpfs reports the same magic when CONFIG_TMPFS=y.)

    The unit tests replace this function to run the walker on a plain directory.
    """
    return statfs(fd).fs_type == TMPFS_MAGIC


def _mount_id(fd: int) -> int:
    """The mount an fd is on (st_dev cannot tell a bind mount of the same superblock)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as fdinfo:
        for line in fdinfo:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo")


class _Unsafe(Exception):  # noqa: N818 - a refusal, not a fault
    """A step the safety rules forbid: an entry replaced since the walk, a symlink on a tmpfs."""


@dataclass(eq=False)
class _Dir:
    """A directory the walk entered; removals reopen it from its base and check its identity."""

    parent: _Dir | None  # None for a base
    name: str
    path: str  # as spelled by the pattern that reached it first
    real_path: str  # with the base's symlinks resolved: what excludes are matched against
    dev: int
    ino: int
    mtime_ns: int
    depth: int
    is_base: bool = False
    entries: int = -1  # entries seen by its first complete scan; -1: not scanned
    gone: int = 0  # of those, removed (or to be removed in a dry run)

    def child_path(self, name: str) -> str:
        return f"{self.path}{name}" if self.path.endswith("/") else f"{self.path}/{name}"

    def real_child_path(self, name: str) -> str:
        real = self.real_path
        return f"{real}{name}" if real.endswith("/") else f"{real}/{name}"


@dataclass(slots=True, eq=False)
class _Candidate:
    directory: _Dir
    name: str
    path: str
    dev: int
    ino: int
    bytes: int
    age_ns: int  # the newest of the rule's age timestamps: watermark order, oldest first


@dataclass(eq=False)
class _Base:
    directory: _Dir
    fd: int
    mount_id: int
    states: set[tuple[int, int]] = field(default_factory=set)  # (pattern, component) to match


class _DirFds:
    """Directory fds for the removal phase: bases stay open, others are reopened and checked."""

    def __init__(self, bases: Mapping[_Dir, int]) -> None:
        self._bases = bases
        self._cache: dict[_Dir, int] = {}

    def get(self, directory: _Dir) -> int:
        if directory in self._bases:
            return self._bases[directory]
        if directory in self._cache:
            return self._cache[directory]
        if directory.parent is None:
            raise _Unsafe(f"{directory.path}: base not open")
        parent_fd = self.get(directory.parent)
        fd = os.open(directory.name, _OPEN_DIR, dir_fd=parent_fd)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (directory.dev, directory.ino):
            os.close(fd)
            raise _Unsafe(f"{directory.path}: directory replaced during cleanup, left alone")
        if len(self._cache) >= _CACHED_DIR_FDS:
            self.close()
        self._cache[directory] = fd
        return fd

    def forget(self, directory: _Dir) -> None:
        fd = self._cache.pop(directory, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()


class _Run:
    """One run of one rule: open the bases, walk each superblock's bases, select, remove."""

    def __init__(
        self,
        paths: HostPaths,
        spec: CleanupSpec,
        held_open: Mapping[tuple[int, int], Sequence[Holder]],
        *,
        dry_run: bool,
        now: float,
    ) -> None:
        self.paths = paths
        self.spec = spec
        self.devtmpfs = devtmpfs_devs(str(paths.proc_root))
        self.held_open = held_open
        self.dry_run = dry_run
        self.patterns = spec._patterns
        self.threshold_ns: int | None = None
        if spec.older_than is not None:
            older_than_us = spec.older_than // timedelta(microseconds=1)
            self.threshold_ns = round(now * 1e9) - older_than_us * 1000
        # A file's age counts only where something compares it: older_than, or watermark order.
        self.uses_age = self.threshold_ns is not None or spec.when_usage_above is not None
        getters = [attrgetter(f"st_{name}_ns") for name in spec.age if name != "btime"]
        self.age_of: Callable[[os.stat_result], int] | None = None
        if getters:
            self.age_of = (
                getters[0] if len(getters) == 1 else lambda st: max(g(st) for g in getters)
            )
        # btime is not in os.stat_result: statx(2), only for rules that ask for it
        self.birth = BirthTime() if "btime" in spec.age and self.uses_age else None
        self.no_btime = 0  # files left alone because their filesystem reports no birth time
        # No watermark: each file is removed as the walk selects it, right after its stat.
        self.inline = spec.when_usage_above is None
        self.exclude_names = _compile_name_excludes(spec.exclude)
        self.exclude_paths: re.Pattern[str] | None = None  # needs the bases: see _open_bases
        # per pattern (index): what became of its base, and the other mounts it met
        self.pattern_states: dict[int, tuple[PatternState, str]] = {}
        self.crossings: dict[int, dict[str, None]] = {}  # ordered sets of mount points
        self._fs_types: dict[int, str] | None = None  # mount id -> fstype, read when needed
        self.real_bases: dict[str, None] = {}  # the walked bases' real paths, in pattern order
        self.dirs: dict[tuple[int, int], _Dir] = {}
        self.seen: set[tuple[int, int, str]] = set()
        self.overlapping = False
        self._held_by_dev: dict[int, frozenset[int]] = {}
        # per superblock, filled by the walk
        self.candidates: list[_Candidate] = []
        self.walked: list[_Dir] = []
        # the result
        self.files_removed = 0
        self.bytes_removed = 0
        self.dirs_removed = 0
        self.removed: list[RemovedFile] = []
        self.would_remove: list[RemovedFile] = []
        self.held: list[HeldOpenFile] = []
        self.locked: list[str] = []
        self.errors: list[str] = []
        self.skipped: list[str] = []
        self.failure = ""

    def __call__(self) -> CleanupResult:
        with ExitStack() as stack:
            try:
                root_fd = os.open(self.paths.host_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                self.failure = f"{self.paths.host_root}: {exc.strerror or exc}"
                return self._result()
            stack.callback(os.close, root_fd)
            superblocks = self._open_bases(root_fd, stack)
            self.exclude_paths = self._compile_path_excludes(root_fd)
            base_fds = {base.directory: base.fd for bases in superblocks.values() for base in bases}
            dir_fds = _DirFds(base_fds)
            stack.callback(dir_fds.close)
            for bases in superblocks.values():
                self._clean_superblock(bases, dir_fds)
        if self.no_btime:
            self.errors.append(
                f"{self.no_btime} files left alone: their filesystem reports no birth time (btime)"
            )
        return self._result()

    def _result(self) -> CleanupResult:
        return CleanupResult(
            name=self.spec.name,
            dry_run=self.dry_run,
            files_removed=self.files_removed,
            bytes_removed=self.bytes_removed,
            dirs_removed=self.dirs_removed,
            removed=self.removed,
            would_remove=self.would_remove,
            held_open=self.held,
            errors=self.errors,
            skipped_not_tmpfs=self.skipped,
            patterns=[self._pattern_result(i) for i in range(len(self.patterns))],
            failure=self.failure,
            locked=self.locked,
        )

    def _pattern_result(self, index: int) -> PatternResult:
        text = self.patterns[index].text
        if self.failure:
            return PatternResult(text, PatternState.FAILED, "not run: " + self.failure)
        state, message = self.pattern_states.get(index, (PatternState.WALKED, ""))
        crossed = list(self.crossings.get(index, ()))
        if state is PatternState.WALKED and crossed:
            listed = ", ".join(crossed[:_CROSSINGS_LISTED])
            more = len(crossed) - _CROSSINGS_LISTED
            return PatternResult(
                text,
                PatternState.INCOMPLETE,
                f"crosses into another mount at {listed}"
                + (f" and {more} more" if more > 0 else "")
                + ": not entered (give each mount its own pattern, or exclude it)",
            )
        return PatternResult(text, state, message)

    def _error(self, path: str, exc: BaseException) -> None:
        self.errors.append(self._message(path, exc))

    @staticmethod
    def _message(path: str, exc: BaseException) -> str:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"{path}: {message}"

    # --- bases -------------------------------------------------------------------------

    def _open_bases(self, root_fd: int, stack: ExitStack) -> dict[int, list[_Base]]:
        """Open every pattern's base; group the tmpfs ones by superblock (st_dev).

        A base that cannot be walked gives its pattern a state (Skipped or Failed) and a message.
        """
        bases: dict[tuple[int, int], _Base] = {}
        for index, pattern in enumerate(self.patterns):
            where = pattern.base_path
            try:
                fd, real = _open_in_root(root_fd, pattern.base)
            except FileNotFoundError:
                self._pattern(index, PatternState.SKIPPED, f"{where} does not exist")
                continue
            except NotADirectoryError:
                self._pattern(index, PatternState.SKIPPED, f"{where} is not a directory")
                continue
            except (OSError, _Unsafe) as exc:
                self._pattern(index, PatternState.FAILED, self._message(where, exc))
                continue
            stack.callback(os.close, fd)
            try:
                st = os.fstat(fd)
                if not _is_tmpfs(fd) or st.st_dev in self.devtmpfs:
                    if where not in self.skipped:
                        self.skipped.append(where)
                    fstype = "devtmpfs" if st.st_dev in self.devtmpfs else self._fs_type(fd)
                    self._pattern(
                        index, PatternState.SKIPPED, f"not on tmpfs: {where} is on {fstype}"
                    )
                    continue
                key = (st.st_dev, st.st_ino)
                if key not in bases:
                    directory = _Dir(
                        parent=None,
                        name="",
                        path=where,
                        real_path=real,
                        dev=st.st_dev,
                        ino=st.st_ino,
                        mtime_ns=st.st_mtime_ns,
                        depth=len(pattern.base),
                        is_base=True,
                    )
                    self.dirs[key] = directory
                    bases[key] = _Base(directory, fd, _mount_id(fd))
            except OSError as exc:
                self._pattern(index, PatternState.FAILED, self._message(where, exc))
                continue
            bases[key].states.add((index, 0))
            self.real_bases.setdefault(real, None)
        superblocks: dict[int, list[_Base]] = {}
        for base in bases.values():
            superblocks.setdefault(base.directory.dev, []).append(base)
        return superblocks

    def _pattern(self, index: int, state: PatternState, message: str) -> None:
        self.pattern_states[index] = (state, message)

    def _fs_type(self, fd: int) -> str:
        """The filesystem type of fd's mount, by its mount id in a mount table (for messages)."""
        if self._fs_types is None:
            self._fs_types = {}
            for reader in ("self", "1"):
                try:
                    text = read_proc_text(f"{self.paths.proc_root}/{reader}/mountinfo", PATH_ERRORS)
                    mounts = parse_mountinfo(text)
                except (OSError, MountinfoError):
                    continue
                self._fs_types.update((m.mount_id, m.fstype) for m in mounts)
        try:
            return self._fs_types.get(_mount_id(fd)) or f"filesystem type {statfs(fd).fs_type:#x}"
        except OSError:
            return "another filesystem"

    def _compile_path_excludes(self, root_fd: int) -> re.Pattern[str] | None:
        """Excludes with `/` as one regex over real paths (see the module doc)."""
        chosen: list[str] = []
        for exclude in self.spec.exclude:
            if "/" not in exclude:
                continue
            if not exclude.startswith("/"):  # relative: to the base of every pattern
                chosen += [_joined(real, exclude) for real in self.real_bases]
                continue
            parts = exclude[1:].split("/")
            literal = _literal_prefix(parts)
            real = "/" + "/".join(parts[:literal])
            if literal:
                try:
                    fd, real = _open_in_root(root_fd, parts[:literal], tmpfs_links=True)
                    os.close(fd)
                except (OSError, _Unsafe):
                    pass  # nothing there to resolve: compare as written
            chosen.append(_joined(real, "/".join(parts[literal:])))
        return re.compile("|".join(chosen)) if chosen else None

    # --- walk --------------------------------------------------------------------------

    def _walk(self, base: _Base) -> None:
        if self._locked(base.fd, base.directory.path):
            return
        self._scan(base, base.directory, base.fd, base.states)

    def _locked(self, fd: int, path: str) -> bool:
        """A process holds a BSD flock on the directory: it and its subtree are left alone.

        As systemd-tmpfiles does (tmpfiles.d(5)): try the lock without waiting, release it at
        once. The check is made when the walk enters the directory.
        """
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if path not in self.locked:  # two bases can reach one directory
                self.locked.append(path)
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def _closure(self, states: set[tuple[int, int]]) -> set[tuple[int, int]]:
        # `**` also matches no directory at all: the next component applies here too.
        closure = set(states)
        for index, position in states:
            if self.patterns[index].components[position].recursive:
                closure.add((index, position + 1))
        return closure

    def _matchers(
        self, states: set[tuple[int, int]]
    ) -> tuple[Callable[[str], object] | None, list[tuple[int, int, _Component]]]:
        """For one directory: the test for file names, and the steps into subdirectories."""
        final: set[_Component] = set()
        steps: list[tuple[int, int, _Component]] = []
        for index, position in self._closure(states):
            components = self.patterns[index].components
            if position == len(components) - 1:
                final.add(components[position])
            else:
                steps.append((index, position, components[position]))
        if not final:
            return None, steps
        if any(component.text == "*" for component in final):
            return _any_name, steps
        if len(final) == 1:
            return next(iter(final)).matches, steps
        return (lambda name: any(component.matches(name) for component in final)), steps

    def _scan(self, base: _Base, directory: _Dir, fd: int, states: set[tuple[int, int]]) -> None:
        """One directory: its files first (while its entries are hot), then its subdirectories."""
        file_matches, steps = self._matchers(states)
        try:
            # a list, not an iterator: one fd per level while descending
            with os.scandir(fd) as scan:
                entries = list(scan)
        except OSError as exc:
            self._error(directory.path, exc)
            return
        first_scan = directory.entries < 0
        if first_scan:
            directory.entries = len(entries)
        real = directory.real_path
        real_prefix = real if real.endswith("/") else f"{real}/"
        excludes = self.exclude_names is not None or self.exclude_paths is not None
        any_name = file_matches is _any_name
        files: list[str] = []
        subdirs: list[tuple[str, set[tuple[int, int]]]] = []
        for entry in entries:
            name = entry.name
            if excludes and self._excluded(name, real_prefix + name):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)  # d_type: no syscall on tmpfs
            except OSError as exc:
                self._error(directory.child_path(name), exc)
                continue
            if is_dir:
                next_states = {
                    (index, position if component.recursive else position + 1)
                    for index, position, component in steps
                    if component.recursive or component.matches(name)
                }
                if next_states:
                    subdirs.append((name, next_states))
            elif any_name or (file_matches is not None and file_matches(name)):
                files.append(name)
        if files:
            self._select(base, directory, fd, files)
        for name, next_states in subdirs:
            try:
                self._descend(base, directory, fd, name, next_states)
            except FileNotFoundError:
                continue  # removed by someone else while we looked
            except OSError as exc:
                self._error(directory.child_path(name), exc)
        if first_scan:
            self.walked.append(directory)

    def _descend(
        self, base: _Base, parent: _Dir, parent_fd: int, name: str, states: set[tuple[int, int]]
    ) -> None:
        path = parent.child_path(name)
        if parent.depth - base.directory.depth >= MAX_DEPTH:
            self.errors.append(f"{path}: deeper than {MAX_DEPTH} levels below the base, not walked")
            return
        # O_NOFOLLOW: a directory swapped for a symlink since readdir fails with ELOOP
        fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
        try:
            st = os.fstat(fd)
            if st.st_dev != base.directory.dev or _mount_id(fd) != base.mount_id:
                # another filesystem or a bind mount: never entered, and said so
                for index, _ in states:
                    self.crossings.setdefault(index, {})[path] = None
                return
            if self._locked(fd, path):
                return  # not in walked, so neither it nor its parent counts as empty
            key = (st.st_dev, st.st_ino)
            directory = self.dirs.get(key)
            if directory is None:
                directory = _Dir(
                    parent=parent,
                    name=name,
                    path=path,
                    real_path=parent.real_child_path(name),
                    dev=st.st_dev,
                    ino=st.st_ino,
                    mtime_ns=st.st_mtime_ns,
                    depth=parent.depth + 1,
                )
                self.dirs[key] = directory
            self._scan(base, directory, fd, states)
        finally:
            os.close(fd)

    def _excluded(self, name: str, path: str) -> bool:
        return (self.exclude_names is not None and self.exclude_names.match(name) is not None) or (
            self.exclude_paths is not None and self.exclude_paths.match(path) is not None
        )

    def _select(self, base: _Base, directory: _Dir, fd: int, names: list[str]) -> None:
        """Stat the matching names of one directory; remove the old ones (or collect them).

        The hot loop of a cleanup: one fstatat per name, and without a watermark one unlinkat
        right after it, so the inode removed is the one just checked (the same re-check a
        deferred removal makes in _remove_file). Names bound to locals on purpose.
        """
        lstat = os.stat
        is_reg = stat.S_ISREG
        is_lnk = stat.S_ISLNK
        dev = base.directory.dev
        threshold = self.threshold_ns
        age_of = self.age_of if self.uses_age else None
        birth = self.birth
        inline = self.inline
        held_inos = self._held_inos(dev) if inline else frozenset()  # watermarks: at removal
        seen = self.seen if self.overlapping else None
        dry_run = self.dry_run
        removed = self.removed
        files = 0
        freed = 0
        gone = 0
        for name in names:
            try:
                st = lstat(name, dir_fd=fd, follow_symlinks=False)
                mode = st.st_mode
                if not (is_reg(mode) or is_lnk(mode)) or st.st_dev != dev:
                    continue  # only files and symlinks; another st_dev: a file mount point
                age_ns = age_of(st) if age_of is not None else 0
                if birth is not None:
                    ino, born = birth.ns(fd, name)
                    if born is None:
                        self.no_btime += 1  # no data, no removal
                        continue
                    if ino != st.st_ino:
                        continue  # replaced between the two stats: left alone
                    age_ns = max(age_ns, born)
                if threshold is not None and age_ns >= threshold:
                    continue
                if seen is not None:
                    entry_key = (directory.dev, directory.ino, name)
                    if entry_key in seen:
                        continue  # matched through an earlier base
                    seen.add(entry_key)
                size = st.st_blocks * 512
                if inline and held_inos and st.st_ino in held_inos:
                    holders = self.held_open[(dev, st.st_ino)]
                    self.held.append(HeldOpenFile(directory.child_path(name), size, tuple(holders)))
                    continue  # removing it would free nothing
                if not inline:
                    self.candidates.append(
                        _Candidate(
                            directory,
                            name,
                            directory.child_path(name),
                            dev,
                            st.st_ino,
                            size,
                            age_ns,
                        )
                    )
                    continue
                if dry_run:
                    self.would_remove.append(RemovedFile(directory.child_path(name), size))
                else:
                    os.unlink(name, dir_fd=fd)
                    if len(removed) < REMOVED_REPORT_LIMIT:
                        removed.append(RemovedFile(directory.child_path(name), size))
                files += 1
                freed += size
                gone += 1
            except FileNotFoundError:
                gone += 1  # removed by someone else while we looked
            except OSError as exc:
                self._error(directory.child_path(name), exc)
        self.files_removed += files
        self.bytes_removed += freed
        directory.gone += gone

    def _held_inos(self, dev: int) -> frozenset[int]:
        """The inodes of one superblock that processes hold open: one set lookup per file."""
        inos = self._held_by_dev.get(dev)
        if inos is None:
            inos = frozenset(ino for held_dev, ino in self.held_open if held_dev == dev)
            self._held_by_dev[dev] = inos
        return inos

    # --- selection and removal -----------------------------------------------------------

    def _clean_superblock(self, bases: list[_Base], dir_fds: _DirFds) -> None:
        self.candidates = []
        self.walked = []
        self.overlapping = len(bases) > 1  # only several bases can reach one entry twice
        for base in bases:
            self._walk(base)  # without a watermark this removes as it goes
        if not self.inline and not self._clean_to_watermark(bases[0], dir_fds):
            return  # below the watermark (or unknown usage): leave everything, dirs too
        if self.spec.remove_empty_dirs:
            self._remove_empty_dirs(dir_fds)

    def _clean_to_watermark(self, base: _Base, dir_fds: _DirFds) -> bool:
        """Remove oldest first until usage <= target. False when the mount is not above."""
        assert self.spec.when_usage_above is not None
        target_usage = self.spec.target_usage
        if target_usage is None:
            target_usage = self.spec.when_usage_above
        size, used = _usage(base.fd)
        if size == 0:
            self.errors.append(
                f"{base.directory.path}: mount has no size limit, usage watermarks do not apply"
            )
            return False
        if used <= self.spec.when_usage_above * size:
            return False
        target = target_usage * size
        ordered = sorted(self.candidates, key=lambda c: (c.age_ns, c.path))
        position = 0
        while True:
            while position < len(ordered) and used > target:
                candidate = ordered[position]
                position += 1
                if self._is_held(candidate):
                    continue  # removing it would free nothing
                self._remove_file(candidate, dir_fds)
                used -= candidate.bytes
            if self.dry_run or position >= len(ordered):
                break
            # the running sum is an estimate (hard links, writers): ask the kernel
            _, used = _usage(base.fd)
            if used <= target:
                break
        return True

    def _is_held(self, candidate: _Candidate) -> bool:
        holders = self.held_open.get((candidate.dev, candidate.ino))
        if not holders:
            return False
        self.held.append(HeldOpenFile(candidate.path, candidate.bytes, tuple(holders)))
        return True

    def _remove_file(self, candidate: _Candidate, dir_fds: _DirFds) -> None:
        if self.dry_run:
            self.would_remove.append(RemovedFile(candidate.path, candidate.bytes))
            self.files_removed += 1
            self.bytes_removed += candidate.bytes
            candidate.directory.gone += 1
            return
        try:
            fd = dir_fds.get(candidate.directory)
            st = os.stat(candidate.name, dir_fd=fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (candidate.dev, candidate.ino) or not (
                stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
            ):
                raise _Unsafe("replaced during cleanup, left alone")
            os.unlink(candidate.name, dir_fd=fd)
        except FileNotFoundError:
            candidate.directory.gone += 1  # removed by someone else
            return
        except (OSError, _Unsafe) as exc:
            self._error(candidate.path, exc)
            return
        if len(self.removed) < REMOVED_REPORT_LIMIT:
            self.removed.append(RemovedFile(candidate.path, candidate.bytes))
        self.files_removed += 1
        self.bytes_removed += candidate.bytes
        candidate.directory.gone += 1

    def _remove_empty_dirs(self, dir_fds: _DirFds) -> None:
        for directory in sorted(self.walked, key=lambda d: -d.depth):
            parent = directory.parent
            if directory.is_base or parent is None or directory.entries != directory.gone:
                continue
            if self.threshold_ns is not None and directory.mtime_ns >= self.threshold_ns:
                continue  # recently changed by someone: may be about to be used
            if not self.dry_run:
                try:
                    parent_fd = dir_fds.get(parent)
                    st = os.stat(directory.name, dir_fd=parent_fd, follow_symlinks=False)
                    if (st.st_dev, st.st_ino) != (directory.dev, directory.ino):
                        raise _Unsafe("replaced during cleanup, left alone")
                    dir_fds.forget(directory)
                    os.rmdir(directory.name, dir_fd=parent_fd)
                except FileNotFoundError:
                    parent.gone += 1
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # refilled meanwhile
                        self._error(directory.path, exc)
                    continue
                except _Unsafe as exc:
                    self._error(directory.path, exc)
                    continue
            self.dirs_removed += 1
            parent.gone += 1


def _any_name(name: str) -> bool:
    return True


def _usage(fd: int) -> tuple[int, int]:
    """(size, used) in bytes of the filesystem of fd; size 0 for an unlimited tmpfs."""
    st = os.fstatvfs(fd)
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


def _open_in_root(
    root_fd: int, parts: Sequence[str], *, tmpfs_links: bool = False
) -> tuple[int, str]:
    """Open the directory `parts` below root_fd as if root_fd were `/` (chroot semantics);
    return its fd and its real path (symlinks resolved) in that root.

    Symlinks are resolved by hand: absolute targets restart at the root, `..` never rises above
    it. A symlink is followed only where it lives on a filesystem that is not tmpfs, unless
    tmpfs_links (resolving an exclude, which can only keep more files).
    """
    stack = [root_fd]  # open directories from the root down; root_fd belongs to the caller
    names: list[str] = []  # the real path of stack[-1]
    pending = list(reversed(parts))
    links = 0
    try:
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                    names.pop()
                continue
            here = stack[-1]
            st = os.stat(part, dir_fd=here, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                if not tmpfs_links and _is_tmpfs(here):
                    raise _Unsafe(
                        f"symlink {part!r} on a tmpfs in the pattern's base, not followed"
                    )
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                target = os.readlink(part, dir_fd=here)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                    names.clear()
                pending.extend(reversed(target.split("/")))
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            stack.append(os.open(part, _OPEN_DIR, dir_fd=here))
            names.append(part)
        real = "/" + "/".join(names)
        return (stack.pop() if len(stack) > 1 else os.dup(root_fd)), real
    finally:
        for fd in stack[1:]:
            os.close(fd)
