"""Futile OOM loops: memory cgroups whose charge is mostly Shmem that no kill can free.

kubernetes#128339: a memory-backed emptyDir fills the pod's limit, the OOM killer kills
the container, the tmpfs stays full (its pages stay charged to the memcg that wrote them,
docs/kernel-facts.md#futile-oom-loops), the restarted container is killed again.

A memcg is *futile* when, with a limit,
    usage  >= USAGE_RATIO x limit     (90 %: near the point where the kernel OOMs), and
    shmem  >= SHMEM_RATIO x usage     (50 %: most of the charge outlives every task).
`freeable` = usage - shmem: what reclaim and killing every task in it can give back at
most. All Shmem charged there counts as staying: tmpfs files and SysV segments outlive
their tasks; memfds and shared anonymous memory would go with their last holder, but
their share of one memcg's charge is not visible without reading every page's memcg.

    figure      v2 (unified)             v1 (memory controller)
    usage       memory.current           memory.usage_in_bytes
    limit       memory.max               memory.limit_in_bytes (PAGE_COUNTER_MAX: none)
    shmem       memory.stat shmem        memory.stat total_shmem
    oom kills   memory.events oom_kill   memory.oom_control oom_kill, summed over the
                (the whole subtree)      subtree (v1 counts only the victim's memcg)

The walk reads only what can OOM on its own: memcgs down to MAX_DEPTH, never below a
container's cgroup (a container's own sub-cgroups), at most MAX_MEMCGS of them.
`OomLoopWatch` keeps each futile memcg's oom_kill count across agent cycles: kills it
sees while the memcg stays futile are `loop_kills`; LOOP_KILLS of them are a loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nodemem.host.identity import matching_cgroup, parse_cgroup_file, parse_cgroup_path
from nodemem.host.oom_predict import memory_cgroup_dir
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import ProcessGone, ProcessUnreadable, read_text
from nodemem.host.shmem import KIND_TMPFS, NodeScan, ShmemObject, TmpfsMount

USAGE_RATIO = 0.9
SHMEM_RATIO = 0.5
LOOP_KILLS = 2  # one kill is an OOM; a second one in the same full memcg is a loop
MAX_DEPTH = 7  # as host/podmem.py: pod levels sit 1-4 below the root on real nodes
MAX_MEMCGS = 4096
MAX_HOLDERS = 10  # per futile memcg
MAX_FILES = 3  # largest files named per tmpfs holder
MAX_WALK = 10_000  # directory entries read per tmpfs to find them

_PAGE = os.sysconf("SC_PAGE_SIZE")
_V1_UNLIMITED = (2**63 - 1) // _PAGE * _PAGE


@dataclass(frozen=True)
class MemcgCounters:
    path: str  # in the memory hierarchy, as /proc/PID/cgroup shows it
    directory: Path
    usage: int
    limit: int | None  # None: unlimited
    shmem: int  # read only near the limit (0 elsewhere: it cannot be futile)
    v2: bool

    @property
    def futile(self) -> bool:
        return (
            self.limit is not None
            and self.usage >= USAGE_RATIO * self.limit
            and self.shmem >= SHMEM_RATIO * self.usage
        )


@dataclass(frozen=True)
class Holder:
    kind: str  # a Shmem kind (tmpfs, sysv, memfd, ...) or "file": a file on a tmpfs holder
    name: str
    bytes: int


@dataclass
class FutileMemcg:
    path: str
    pod_uid: str | None
    usage: int
    limit: int
    shmem: int
    oom_kills: int | None  # None: the kernel does not count them (v1 before 4.13)
    loop_kills: int = 0
    holders: list[Holder] = field(default_factory=list)

    @property
    def freeable(self) -> int:
        return max(0, self.usage - self.shmem)

    @property
    def looping(self) -> bool:
        return self.loop_kills >= LOOP_KILLS


def walk_memcgs(root: Path, root_path: str) -> Iterator[tuple[Path, str]]:
    """(directory, hierarchy path) of every memcg below `root`, within the bounds."""
    stack: list[tuple[Path, str, int]] = [(root, root_path.rstrip("/"), 0)]
    seen = 0
    while stack:
        directory, path, depth = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:  # removed meanwhile
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            seen += 1
            if seen > MAX_MEMCGS:
                return
            child = f"{path}/{entry.name}"
            yield Path(entry.path), child
            if parse_cgroup_path(child).container_id is None and depth + 1 < MAX_DEPTH:
                stack.append((Path(entry.path), child, depth + 1))


def read_counters(directory: Path, path: str) -> MemcgCounters | None:
    """The memcg's counters; None when it is no memcg (v2 without +memory) or went away.
    memory.stat (the costly file: dozens of counters, v1 sums them over the subtree) is
    read only for a memcg near its limit; elsewhere shmem is left 0."""
    try:
        v2 = (directory / "memory.current").exists()
        if v2:
            text = read_value(directory / "memory.max")
            limit = None if text == "max" else int(text)
            usage = int(read_value(directory / "memory.current"))
        else:
            limit_v1 = int(read_value(directory / "memory.limit_in_bytes"))
            limit = None if limit_v1 >= _V1_UNLIMITED else limit_v1
            usage = int(read_value(directory / "memory.usage_in_bytes"))
        shmem = 0
        if limit is not None and usage >= USAGE_RATIO * limit:
            stat = flat_keyed(directory / "memory.stat")
            shmem = stat.get("shmem", 0) if v2 else stat.get("total_shmem", stat.get("shmem", 0))
    except (OSError, ValueError):
        return None
    return MemcgCounters(path, directory, usage, limit, shmem, v2)


def oom_kills(counters: MemcgCounters) -> int | None:
    if counters.v2:
        try:
            return flat_keyed(counters.directory / "memory.events").get("oom_kill")
        except OSError:
            return None
    return v1_oom_kills(counters.directory)


def v1_oom_kills(directory: Path) -> int | None:
    """oom_kill of memory.oom_control (4.13+) summed over `directory` and all below it:
    v1 counts a kill only in the victim's own cgroup."""
    total: int | None = None
    for current, _dirs, _files in os.walk(directory):
        try:
            kills = flat_keyed(Path(current) / "memory.oom_control").get("oom_kill")
        except OSError:
            continue
        if kills is not None:
            total = (total or 0) + kills
    return total


def flat_keyed(file: Path) -> dict[str, int]:
    """`key value` lines (memory.stat, memory.events, memory.oom_control)."""
    values: dict[str, int] = {}
    for line in read_value(file).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def read_value(file: Path) -> str:
    """A cgroup file's text, stripped."""
    with open(file) as handle:
        return handle.read().strip()


def find_futile(
    paths: HostPaths, scan: NodeScan | None, root: Path | None = None
) -> list[FutileMemcg]:
    """Every futile memcg below `root` (default: the whole memory hierarchy), fullest
    first, with the Shmem objects of `scan` that may be charged there as holders."""
    try:
        if root is None:
            root_path, root, _mount = memory_cgroup_dir(paths, "/")
        else:
            root_path, root, _mount = memory_cgroup_dir(paths, str(root))
    except (LookupError, OSError):
        return []  # no memory hierarchy
    return futile_below(paths, scan, root, root_path)


def futile_below(
    paths: HostPaths, scan: NodeScan | None, root: Path, root_path: str
) -> list[FutileMemcg]:
    """find_futile for the memcg directory `root`, at `root_path` in the hierarchy."""
    found = []
    for directory, path in walk_memcgs(root, root_path):
        counters = read_counters(directory, path)
        if counters is None or not counters.futile:
            continue
        assert counters.limit is not None
        found.append(
            FutileMemcg(
                path=path,
                pod_uid=parse_cgroup_path(path).pod_uid,
                usage=counters.usage,
                limit=counters.limit,
                shmem=counters.shmem,
                oom_kills=oom_kills(counters),
            )
        )
    if scan is not None and found:
        _add_holders(paths, scan, found)
    return sorted(found, key=lambda f: (-f.shmem, f.path))


def _add_holders(paths: HostPaths, scan: NodeScan, futile: Sequence[FutileMemcg]) -> None:
    """Objects a futile memcg's pages may be: those of its pod (a volume path, the pod's
    own mount or IPC namespace: host/shmem.py) and those a task inside it holds."""
    memcg_of: dict[int, str | None] = {}
    for memcg in futile:
        objects = [
            obj
            for obj in scan.shmem.objects
            if (memcg.pod_uid is not None and obj.pod == memcg.pod_uid)
            or any(_below(_memcg_of(paths, pid, memcg_of), memcg.path) for pid in obj.holders)
        ]
        holders: list[Holder] = []
        for obj in sorted(objects, key=lambda o: (-o.bytes, o.name))[:MAX_HOLDERS]:
            holders.append(Holder(obj.kind, obj.name, obj.bytes))
            if obj.kind == KIND_TMPFS:
                holders += largest_files(obj, scan.tmpfs_mounts)
        memcg.holders = holders


def _memcg_of(paths: HostPaths, pid: int, cache: dict[int, str | None]) -> str | None:
    if pid not in cache:
        try:
            cache[pid] = matching_cgroup(parse_cgroup_file(read_text(paths, pid, "cgroup")))
        except (ProcessGone, ProcessUnreadable):
            cache[pid] = None
    return cache[pid]


def _below(path: str | None, top: str) -> bool:
    return path is not None and (path == top or path.startswith(top.rstrip("/") + "/"))


def largest_files(obj: ShmemObject, mounts: Iterable[TmpfsMount]) -> list[Holder]:
    """The MAX_FILES largest files of a tmpfs object, when its mount point is reachable
    here and is still that superblock (a mount in another namespace is not walked)."""
    dev = next((m.dev for m in mounts if m.name == obj.name), None)
    try:
        if dev is None or os.stat(obj.name).st_dev != dev:
            return []
    except OSError:
        return []
    files: list[Holder] = []
    stack = [obj.name]
    read = 0
    while stack and read < MAX_WALK:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries[: MAX_WALK - read]:
            read += 1
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != dev:
                continue  # another mount below it: not this tmpfs
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                files.append(Holder("file", entry.path, st.st_blocks * 512))
    files.sort(key=lambda h: (-h.bytes, h.name))
    return [h for h in files[:MAX_FILES] if h.bytes > 0]


class OomLoopWatch:
    """Futile memcgs across agent cycles: the oom_kill increments of each while it stays
    futile. A memcg that stops being futile, or goes away, is forgotten."""

    def __init__(self) -> None:
        self._baseline: dict[str, int] = {}  # path -> oom_kill when first seen futile

    def observe(
        self, paths: HostPaths, scan: NodeScan | None, root: Path | None = None
    ) -> list[FutileMemcg]:
        return self.track(find_futile(paths, scan, root))

    def track(self, futile: list[FutileMemcg]) -> list[FutileMemcg]:
        """Sets each one's loop_kills from what this watch saw before; returns them."""
        baseline: dict[str, int] = {}
        for memcg in futile:
            kills = memcg.oom_kills
            if kills is None:
                continue
            # min: a new memcg at the same path restarted its counter
            start = min(self._baseline.get(memcg.path, kills), kills)
            baseline[memcg.path] = start
            memcg.loop_kills = kills - start
        self._baseline = baseline
        return futile
