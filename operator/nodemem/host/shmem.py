"""Shmem attribution: which objects hold the node's Shmem, and who holds them.

docs/kernel-facts.md#attribution is the specification. No single method sees every object, so
five are combined, each keyed so that nothing is counted twice:

  tmpfs/devtmpfs superblocks of every mount namespace   statfs, keyed by st_dev
  detached or covered superblocks pinned by an fd/map   statfs through the fd
  SysV segments of every IPC namespace                  /proc/sysvipc/shm rss
  memfds and other objects on the internal shm_mnt      st_blocks, keyed (dev, ino)
  shared anonymous memory, mapped-only memfds           maps + map_files

Deleted-but-open files on a mounted tmpfs are already inside that tmpfs's statfs
figure: they are listed with their holder, never added again.

The fd and maps reads cost several times the status reads (bench/scan.py measures it;
docs/kernel-facts.md#cost-of-proc-reads). `ShmemTracker` runs the agent's repeated
passes: a process's fds are read again when their count changed, its maps when RssShmem
or VmSize changed; otherwise what it held last time is stat'ed again (fresh bytes; a
changed dev, inode or link count means a re-read), and every few passes everything is
read. `scan_node()` is a full pass.
"""

from __future__ import annotations

import os
import re
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from nodemem.host.identity import read_pod_cgroup
from nodemem.host.meminfo import MemoryBreakdown, breakdown, read_meminfo
from nodemem.host.mounts import PATH_ERRORS, TMPFS_MAGIC, Mount, parse_mountinfo
from nodemem.host.paths import HostPaths
from nodemem.host.pods import pod_volume_from_path
from nodemem.host.procfs import (
    Holder,
    ProcessGone,
    ProcessUnreadable,
    ProcStatus,
    classify,
    namespace_id,
    read_status,
    read_text,
)
from nodemem.host.procmaps import file_mappings, maps_dev
from nodemem.host.statfs import statfs, walk_usage
from nodemem.host.sysvipc import SysvSegment, read_segments, read_segments_in_namespace_of

KIND_TMPFS = "tmpfs"
KIND_SYSV = "sysv"
KIND_MEMFD = "memfd"
KIND_SHARED_ANON = "sharedAnon"
KIND_DETACHED = "detachedTmpfs"
KINDS = (KIND_TMPFS, KIND_SYSV, KIND_MEMFD, KIND_SHARED_ANON, KIND_DETACHED)

_DELETED = " (deleted)"
_MAX_HOLDERS = 10


@dataclass
class ShmemObject:
    kind: str
    name: str
    bytes: int
    holders: dict[int, str] = field(default_factory=dict)  # pid -> comm
    pod: str | None = None
    note: str = ""
    orphan: bool = False  # sysv: nattch 0, attached to no process

    def add_holder(self, holder: Holder) -> None:
        if holder.pid in self.holders or len(self.holders) < _MAX_HOLDERS:
            self.holders[holder.pid] = holder.comm


@dataclass(frozen=True)
class DeletedOpenFile:
    """An unlinked file on a tmpfs that a process still holds (fd or mapping)."""

    path: str
    bytes: int
    pid: int
    comm: str
    dev: int
    ino: int


@dataclass(frozen=True)
class TmpfsMount:
    """One measured tmpfs (or devtmpfs) superblock: what `df` shows for it."""

    dev: int
    name: str  # as its Shmem object is named: the mount point, maybe with a suffix
    size: int  # statfs size limit; 0: unlimited (size=0)
    used: int
    pod: str | None


@dataclass(frozen=True)
class UnreadableProcess:
    pid: int
    comm: str
    what: str  # "fd", "maps", "ns/mnt", ...
    reason: str


@dataclass
class ShmemAttribution:
    total: int
    objects: list[ShmemObject]
    deleted_open_files: list[DeletedOpenFile]

    @property
    def attributed(self) -> int:
        return sum(obj.bytes for obj in self.objects)

    @property
    def unaccounted(self) -> int:
        return self.total - self.attributed

    def by_kind(self) -> dict[str, int]:
        sums = dict.fromkeys(KINDS, 0)
        for obj in self.objects:
            sums[obj.kind] += obj.bytes
        return sums


@dataclass
class NodeScan:
    full: bool  # every process's fds and maps were read (not replayed from the last pass)
    memory: MemoryBreakdown
    processes: dict[int, ProcStatus]
    shmem: ShmemAttribution
    unreadable: list[UnreadableProcess]
    vanished: int  # processes that exited during the scan
    # Files on tmpfs that some process holds open, (st_dev, st_ino) -> holders:
    # cleanup must not remove them (that frees nothing).
    open_tmpfs_files: dict[tuple[int, int], list[Holder]]
    # Every superblock whose size and use could be read (a covered one may not be).
    tmpfs_mounts: list[TmpfsMount] = field(default_factory=list)

    @property
    def unreadable_processes(self) -> int:
        return len({entry.pid for entry in self.unreadable})


def shm_mnt_dev() -> int | None:
    """st_dev of the kernel's internal shm_mnt (memfd, shared anon, SysV live there)."""
    try:
        fd = os.memfd_create("nodemem-probe", os.MFD_CLOEXEC)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _HeldFile:
    """An fd or mapping of a file that may hold Shmem, as the last read found it."""

    via: str  # /proc/PID/fd/N or /proc/PID/map_files/RANGE
    link: str  # what the fd's link or the maps line named
    dev: int
    ino: int


@dataclass(frozen=True)
class _Part:
    """What one read of a process's fds or maps found, and the signal it was read at."""

    signal: object  # fds: the fd count; maps: (RssShmem, VmSize). Falsy: always read.
    held: list[_HeldFile]
    refusals: list[UnreadableProcess]


# A process is read in full in the first passes that see it: starting up, it opens
# and closes files (and joins namespaces), so one read may show a passing moment whose
# fd count it later has again with other files (seen in CI).
_UNSETTLED_PASSES = 2


@dataclass
class _ProcessMemo:
    """What one process held at the last read; reused while its cheap signals hold."""

    token: tuple[int, str, int]  # /proc/PID inode, comm, ppid: new process, exec, reparent
    passes: int = 1  # consecutive passes that saw this process (same token)
    namespaces: dict[str, int] = field(default_factory=dict)
    namespace_refusals: list[UnreadableProcess] = field(default_factory=list)
    parts: dict[str, _Part] = field(default_factory=dict)  # "fd", "maps"


@dataclass
class _Superblock:
    dev: int
    mounts: list[tuple[int, Mount]]  # (pid of a reader in that namespace, mount)
    reachable_path: str | None = None
    used: int | None = None  # None: usage not reachable by path
    unlimited: bool = False
    size: int | None = None  # statfs size limit, with `used`


class _Scanner:
    def __init__(
        self, paths: HostPaths, previous: Mapping[int, _ProcessMemo] | None = None
    ) -> None:
        self.paths = paths
        self.previous = previous or {}
        self.memo: dict[int, _ProcessMemo] = {}
        self.reused: dict[int, _ProcessMemo] = {}  # previous memos of unchanged processes
        self.fresh: dict[tuple[int, int], os.stat_result] = {}  # stat'ed in this pass
        self.processes: dict[int, ProcStatus] = {}
        self.unreadable: list[UnreadableProcess] = []
        self.vanished = 0
        self.mnt_ns: dict[int, list[int]] = defaultdict(list)
        self.ipc_ns: dict[int, list[int]] = defaultdict(list)
        self.pid_ipc_ns: dict[int, int] = {}
        self.shm_dev = shm_mnt_dev()
        self.superblocks: dict[int, _Superblock] = {}
        self.all_devs: set[int] = set()
        self.objects: dict[tuple[object, ...], ShmemObject] = {}
        self.deleted: dict[tuple[int, int], DeletedOpenFile] = {}
        self.open_tmpfs_files: dict[tuple[int, int], dict[int, str]] = defaultdict(dict)
        self.foreign_devs: dict[int, int | None] = {}  # dev -> statfs f_type (None: unknown)
        self.sysv_attachers: dict[tuple[int, int], dict[int, str]] = defaultdict(dict)
        self.pod_of: dict[int, str | None] = {}  # pid -> pod UID, read once per pass
        self.sysv_hugetlb: set[tuple[int, int]] = set()
        self.own_mnt = self.own_namespace("mnt")
        self.boring_map_devs: set[str] = {"00:00"}

    # -- bookkeeping ------------------------------------------------------------------

    def refused(self, pid: int, what: str, reason: str) -> None:
        comm = self.processes[pid].comm if pid in self.processes else "?"
        self.unreadable.append(UnreadableProcess(pid, comm, what, reason))

    def holder(self, pid: int) -> Holder:
        return Holder(pid, self.processes[pid].comm)

    # -- processes and namespaces -----------------------------------------------------

    def read_processes(self) -> None:
        for entry in os.scandir(self.paths.proc_root):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                status = read_status(self.paths, pid)
            except ProcessGone:
                self.vanished += 1
                continue
            except ProcessUnreadable as exc:
                self.unreadable.append(UnreadableProcess(pid, "?", exc.what, str(exc.error)))
                continue
            if status.kthread:
                continue
            self.processes[pid] = status
            try:
                token = (entry.inode(), status.comm, status.ppid)
            except OSError:
                token = (-1, status.comm, status.ppid)
            memo = self.memo[pid] = _ProcessMemo(token)
            previous = self.previous.get(pid)
            if previous is not None and previous.token == token:
                memo.passes = previous.passes + 1
            if previous is not None and memo.passes > _UNSETTLED_PASSES:
                self.reused[pid] = previous
                memo.namespaces = previous.namespaces
                memo.namespace_refusals = previous.namespace_refusals
                self.unreadable.extend(memo.namespace_refusals)
            else:
                before = len(self.unreadable)
                memo.namespaces = self.read_namespaces(pid)
                memo.namespace_refusals = self.unreadable[before:]
            for kind, ns in memo.namespaces.items():
                (self.mnt_ns if kind == "mnt" else self.ipc_ns)[ns].append(pid)
            if "ipc" in memo.namespaces:
                self.pid_ipc_ns[pid] = memo.namespaces["ipc"]

    def read_namespaces(self, pid: int) -> dict[str, int]:
        namespaces: dict[str, int] = {}
        for kind in ("mnt", "ipc"):
            try:
                namespaces[kind] = namespace_id(self.paths, pid, kind)
            except ProcessGone:
                break
            except ProcessUnreadable as exc:
                self.refused(pid, exc.what, exc.error.strerror or str(exc.error))
        return namespaces

    def reuse_or_read(
        self, pid: int, part: str, signal: object, read: Callable[[], list[_HeldFile]]
    ) -> None:
        """Replays what `pid` held at the last read while `signal` is unchanged, else reads."""
        previous = self.reused.get(pid)
        last = previous.parts.get(part) if previous is not None else None
        if last is not None and signal and last.signal == signal and self.replay(pid, last.held):
            self.memo[pid].parts[part] = last
            self.unreadable.extend(last.refusals)
            return
        before = len(self.unreadable)
        held = read()
        self.memo[pid].parts[part] = _Part(signal, held, self.unreadable[before:])

    def own_namespace(self, kind: str) -> int | None:
        try:
            return namespace_id(self.paths, "self", kind)
        except (ProcessGone, ProcessUnreadable):
            return None

    # -- (a) tmpfs superblocks of every mount namespace ---------------------------------

    def read_mounts(self) -> None:
        for pids in self.mnt_ns.values():
            for pid in pids:  # one readable process per namespace is enough
                try:
                    text = read_text(self.paths, pid, "mountinfo", errors=PATH_ERRORS)
                    mounts = parse_mountinfo(text)
                except ProcessGone:
                    continue
                except ProcessUnreadable as exc:
                    self.refused(pid, exc.what, exc.error.strerror or str(exc.error))
                    continue
                for mount in mounts:
                    self.all_devs.add(mount.dev)
                    if mount.is_shmem:
                        sb = self.superblocks.setdefault(mount.dev, _Superblock(mount.dev, []))
                        sb.mounts.append((pid, mount))
                break
        # Mappings of files on these devices are ordinary (libraries, binaries, data).
        plain = self.all_devs - self.superblocks.keys() - {self.shm_dev}
        self.boring_map_devs = {maps_dev(dev) for dev in plain} | {"00:00"}

    def path_in_namespace(self, pid: int, mount_point: str) -> str:
        own = self.own_mnt is not None and pid in self.mnt_ns.get(self.own_mnt, ())
        if own and self.paths.host_root == type(self.paths.host_root)("/"):
            return mount_point
        return str(self.paths.in_namespace_of(pid, mount_point))

    def measure_superblocks(self) -> None:
        for sb in self.superblocks.values():
            for pid, mount in sb.mounts:
                path = self.path_in_namespace(pid, mount.mount_point)
                try:
                    # Stacked mounts: the path shows the top superblock, maybe not this one.
                    if os.stat(path).st_dev != sb.dev:
                        continue
                    fs = statfs(path)
                except OSError:
                    continue
                sb.reachable_path = path
                sb.unlimited = fs.blocks == 0
                sb.size = fs.size_bytes
                sb.used = walk_usage(path, sb.dev) if sb.unlimited else fs.used_bytes
                break

    # -- (b, d) open files ------------------------------------------------------------

    def scan_fds(self, pid: int) -> None:
        fd_dir = f"{self.paths.proc_root}/{pid}/fd"
        try:
            # The number of open fds (kernel 6.2+). Before 6.2 always 0: no signal, read.
            fd_count = os.stat(fd_dir).st_size
        except OSError:
            fd_count = 0
        self.reuse_or_read(pid, "fd", fd_count, lambda: self.read_fds(pid, fd_dir))

    def read_fds(self, pid: int, fd_dir: str) -> list[_HeldFile]:
        """Attributes the open files of `pid`; returns those that may hold Shmem."""
        held: list[_HeldFile] = []
        try:
            fds = os.listdir(fd_dir)
        except OSError as exc:
            self.fd_error(pid, exc)
            return held
        holder = self.holder(pid)
        for fd in fds:
            fd_path = f"{fd_dir}/{fd}"
            try:
                link = os.readlink(fd_path)
                if not link.startswith("/"):
                    continue  # socket:, pipe:, anon_inode:
                st = os.stat(fd_path)
            except OSError as exc:
                if self.fd_error(pid, exc):
                    break
                continue
            if self.classify_file(pid, holder, link, st, fd_path):
                self.fresh[(st.st_dev, st.st_ino)] = st
                held.append(_HeldFile(fd_path, link, st.st_dev, st.st_ino))
        return held

    def replay(self, pid: int, held: list[_HeldFile]) -> bool:
        """Attributes again what `pid` held at the last read; False if any of it changed."""
        holder = self.holder(pid)
        for item in held:
            if item.link.startswith("/SYSV"):  # a SysV attach: its bytes come from sysvipc
                self.note_sysv_attach(pid, holder, item.dev, item.ino)
                continue
            st = self.restat(item)
            if st is None:
                return False
            self.classify_file(pid, holder, item.link, st, item.via)
        return True

    def restat(self, item: _HeldFile) -> os.stat_result | None:
        """Fresh stat of a held file (once per file and pass); None if it changed."""
        key = (item.dev, item.ino)
        st = self.fresh.get(key)
        if st is None:
            try:
                st = os.stat(item.via)
            except OSError:
                return None  # closed, unmapped or exited
            if (st.st_dev, st.st_ino) != key:
                return None  # the fd number or address range now holds another file
            self.fresh[key] = st
        # Unlinked (or linked again) since the read: the link text, and the report, differ.
        if item.dev != self.shm_dev and (st.st_nlink == 0) != item.link.endswith(_DELETED):
            return None
        return st

    def fd_error(self, pid: int, exc: OSError) -> bool:
        """Record a refusal; True when the whole process is unreadable or gone."""
        error = classify(pid, "fd", exc)
        if isinstance(error, ProcessUnreadable):
            self.refused(pid, "fd", exc.strerror or str(exc))
            return True
        return isinstance(error, ProcessGone)

    def classify_file(
        self, pid: int, holder: Holder, link: str, st: os.stat_result, via: str
    ) -> bool:
        """Attributes one open or mapped file; True when it may hold Shmem."""
        dev, ino = st.st_dev, st.st_ino
        if dev == self.shm_dev:
            self.add_shm_mnt_object(holder, link, st)
            return True
        sb = self.superblocks.get(dev)
        if sb is not None:
            if not stat.S_ISREG(st.st_mode):
                return False  # /dev/null and friends on devtmpfs hold no memory
            self.open_tmpfs_files[(dev, ino)][pid] = holder.comm
            if link.endswith(_DELETED):
                self.add_deleted(pid, holder, link, st)
            if sb.used is None:  # covered or otherwise unreachable: measure through the fd
                self.measure_through(sb, via)
            self.tmpfs_object(sb).add_holder(holder)
            return True
        if dev in self.all_devs:
            return False
        if self.foreign_type(dev, via) == TMPFS_MAGIC:
            self.add_detached(holder, link, st, via)
            return True
        return False

    def foreign_type(self, dev: int, via: str) -> int | None:
        if dev not in self.foreign_devs:
            try:
                self.foreign_devs[dev] = statfs(via).fs_type
            except OSError:
                self.foreign_devs[dev] = None
        return self.foreign_devs[dev]

    def add_shm_mnt_object(self, holder: Holder, link: str, st: os.stat_result) -> None:
        name = link.removesuffix(_DELETED)
        if name.startswith("/SYSV"):
            return  # counted from /proc/sysvipc/shm
        key = ("shm_mnt", st.st_dev, st.st_ino)
        obj = self.objects.get(key)
        if obj is None:
            if name.startswith("/memfd:"):
                kind, label, note = KIND_MEMFD, name[1:], ""
            elif name == "/dev/zero":
                kind, label, note = KIND_SHARED_ANON, name, "shared anonymous memory"
            else:
                kind, label, note = KIND_MEMFD, name, "internal shmem object"
            obj = self.objects[key] = ShmemObject(kind, label, st.st_blocks * 512, note=note)
        obj.add_holder(holder)

    def add_deleted(self, pid: int, holder: Holder, link: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key not in self.deleted:
            self.deleted[key] = DeletedOpenFile(
                path=link.removesuffix(_DELETED),
                bytes=st.st_blocks * 512,
                pid=pid,
                comm=holder.comm,
                dev=st.st_dev,
                ino=st.st_ino,
            )

    def measure_through(self, sb: _Superblock, via: str) -> None:
        try:
            fs = statfs(via)
        except OSError:
            return
        if fs.blocks:
            sb.used, sb.size = fs.used_bytes, fs.size_bytes
            self.tmpfs_object(sb).note = "covered by a later mount; measured through an open file"

    def add_detached(self, holder: Holder, link: str, st: os.stat_result, via: str) -> None:
        key = ("detached", st.st_dev)
        obj = self.objects.get(key)
        if obj is None:
            try:
                fs = statfs(via)
            except OSError:
                return
            note = "lazily unmounted, pinned by open files"
            if fs.blocks == 0:
                note += "; unlimited (size=0): only the pinned files are counted"
            obj = self.objects[key] = ShmemObject(
                KIND_DETACHED,
                f"{os.major(st.st_dev)}:{os.minor(st.st_dev)} (file {link})",
                fs.used_bytes if fs.blocks else st.st_blocks * 512,
                note=note,
            )
        obj.add_holder(holder)

    # -- (e) shared anonymous memory and mapped-only memfds ---------------------------

    def scan_maps(self, pid: int) -> None:
        status = self.processes[pid]
        if status.rss_shmem_bytes == 0:
            return  # the cheap pre-filter: no shmem pages mapped
        signal = (status.rss_shmem_bytes, status.vm_size_bytes)
        self.reuse_or_read(pid, "maps", signal, lambda: self.read_maps(pid))

    def read_maps(self, pid: int) -> list[_HeldFile]:
        """Attributes the shared mappings of `pid`; returns those that may hold Shmem."""
        held: list[_HeldFile] = []
        try:
            mappings = file_mappings(read_text(self.paths, pid, "maps"), self.boring_map_devs)
        except ProcessGone:
            return held
        except ProcessUnreadable as exc:
            self.refused(pid, "maps", exc.error.strerror or str(exc.error))
            return held
        holder = self.holder(pid)
        seen: set[tuple[int, int]] = set()
        for mapping in mappings:
            key = (mapping.dev, mapping.inode)
            if key in seen:
                continue
            seen.add(key)
            via = f"{self.paths.proc_root}/{pid}/map_files/{mapping.range_name}"
            if mapping.path.startswith("/SYSV"):
                self.note_sysv_attach(pid, holder, mapping.dev, mapping.inode)
                held.append(_HeldFile(via, mapping.path, *key))
                continue
            if self.needs_stat(holder, mapping.dev, key, mapping.path):
                try:
                    st = os.stat(via)
                except OSError as exc:
                    error = classify(pid, "map_files", exc)
                    if isinstance(error, ProcessUnreadable):
                        self.refused(pid, "map_files", exc.strerror or str(exc))
                    if isinstance(error, ProcessUnreadable | ProcessGone):
                        break
                    continue
                self.classify_file(pid, holder, mapping.path, st, via)
            if self.may_hold_shmem(mapping.dev):
                held.append(_HeldFile(via, mapping.path, *key))
        return held

    def may_hold_shmem(self, dev: int) -> bool:
        if dev == self.shm_dev or dev in self.superblocks:
            return True
        return dev not in self.all_devs and self.foreign_devs.get(dev) == TMPFS_MAGIC

    def note_sysv_attach(self, pid: int, holder: Holder, dev: int, shmid: int) -> None:
        ipc = self.pid_ipc_ns.get(pid)
        if ipc is None:
            return
        # The inode of a SysV mapping is its shmid, which repeats across namespaces.
        self.sysv_attachers[(ipc, shmid)][pid] = holder.comm
        if dev != self.shm_dev:
            self.sysv_hugetlb.add((ipc, shmid))

    def needs_stat(self, holder: Holder, dev: int, key: tuple[int, int], path: str) -> bool:
        """Whether a mapping is a new object that only map_files can measure."""
        if dev == self.shm_dev:
            known = self.objects.get(("shm_mnt", *key))
            if known is not None:
                known.add_holder(holder)
            return known is None
        sb = self.superblocks.get(dev)
        if sb is not None:
            self.open_tmpfs_files[key][holder.pid] = holder.comm
            self.tmpfs_object(sb).add_holder(holder)
            unmeasured_deleted = path.endswith(_DELETED) and key not in self.deleted
            return unmeasured_deleted or sb.used is None
        if dev in self.all_devs:
            return False  # an ordinary file mapping (libraries, binaries)
        detached = self.objects.get(("detached", dev))
        if detached is not None:
            detached.add_holder(holder)
            return False
        return self.foreign_devs.get(dev, TMPFS_MAGIC) == TMPFS_MAGIC

    # -- (c) SysV ---------------------------------------------------------------------

    def scan_sysv(self) -> None:
        own_ipc = self.own_namespace("ipc")
        for ns, pids in self.ipc_ns.items():
            segments: list[SysvSegment] | None = None
            if ns == own_ipc:
                segments = read_segments(self.paths)
            else:
                for pid in pids:
                    try:
                        segments = read_segments_in_namespace_of(self.paths, pid)
                        break
                    except OSError as exc:
                        error = classify(pid, "ns/ipc", exc)
                        if not isinstance(error, ProcessGone):
                            self.refused(pid, "ns/ipc", exc.strerror or str(exc))
            for segment in segments or ():
                self.add_sysv(ns, ns == own_ipc, segment)

    def add_sysv(self, ns: int, own: bool, segment: SysvSegment) -> None:
        if (ns, segment.shmid) in self.sysv_hugetlb:
            return  # SHM_HUGETLB: hugetlb pages, not Shmem
        notes = []
        if segment.nattch == 0:
            notes.append(f"orphan: nattch 0 (created by pid {segment.cpid})")
        if not own:
            notes.append(f"ipc namespace {ns}")
        if segment.swap_bytes:
            notes.append(f"{segment.swap_bytes} bytes swapped out")
        obj = ShmemObject(KIND_SYSV, f"shmid {segment.shmid}", segment.rss_bytes)
        obj.note = "; ".join(notes)
        obj.orphan = segment.nattch == 0
        for pid, comm in self.sysv_attachers.get((ns, segment.shmid), {}).items():
            obj.add_holder(Holder(pid, comm))
        if segment.nattch == 0 and segment.cpid in self.processes:
            obj.add_holder(self.holder(segment.cpid))
        self.objects[("sysv", ns, segment.shmid)] = obj

    # -- assembly ---------------------------------------------------------------------

    def tmpfs_object(self, sb: _Superblock) -> ShmemObject:
        key = ("tmpfs", sb.dev)
        obj = self.objects.get(key)
        if obj is None:
            obj = self.objects[key] = ShmemObject(KIND_TMPFS, _superblock_name(self, sb), 0)
        return obj

    def finish_superblocks(self) -> None:
        deleted_by_dev: dict[int, int] = defaultdict(int)
        for entry in self.deleted.values():
            deleted_by_dev[entry.dev] += entry.bytes
        for sb in self.superblocks.values():
            obj = self.tmpfs_object(sb)
            mount = sb.mounts[0][1]
            notes = [obj.note] if obj.note else []
            if mount.fstype == "devtmpfs":
                notes.append("devtmpfs")
            if sb.used is None:
                notes.append("covered by a later mount; usage not reachable")
            elif sb.unlimited:
                # statfs hides the usage of an unlimited tmpfs: files were walked, and
                # unlinked-but-open files (invisible to the walk) are added.
                sb.used += deleted_by_dev[sb.dev]
                notes.append("unlimited (size=0): usage from a file walk")
            obj.bytes = sb.used or 0
            obj.note = "; ".join(dict.fromkeys(notes))
            for _pid, each in sb.mounts:
                volume = pod_volume_from_path(each.mount_point)
                if volume is not None:
                    obj.pod = volume.pod_uid
                    break

    def tmpfs_mounts(self) -> list[TmpfsMount]:
        mounts = []
        for sb in self.superblocks.values():
            if sb.used is None or sb.size is None:
                continue
            obj = self.tmpfs_object(sb)
            mounts.append(TmpfsMount(sb.dev, obj.name, sb.size, obj.bytes, obj.pod))
        return mounts

    def pod_of_pid(self, pid: int) -> str | None:
        if pid not in self.pod_of:
            try:
                self.pod_of[pid] = read_pod_cgroup(self.paths, pid).pod_uid
            except (ProcessGone, ProcessUnreadable):
                self.pod_of[pid] = None
        return self.pod_of[pid]

    def only_pod(self, pids: Iterable[int]) -> str | None:
        """The pod every one of `pids` runs in; None when one is in no pod or pods differ."""
        found: str | None = None
        for pid in pids:
            pod = self.pod_of_pid(pid)
            if pod is None or (found is not None and pod != found):
                return None  # stops at the first host process: most namespaces end here
            found = pod
        return found

    def pods_from_holders(self) -> None:
        """An object whose holders all run in one pod belongs to that pod."""
        for obj in self.objects.values():
            if obj.pod is not None or not obj.holders:
                continue
            pods = {self.pod_of_pid(pid) for pid in obj.holders}
            if len(pods) == 1:
                obj.pod = pods.pop()

    def pods_from_charge(self) -> None:
        """The pod an object's pages are charged to, for objects no holder names a pod of.

        A shmem page is charged to the memcg of the task that allocated it (faulted it in
        or wrote it) and stays charged there; no per-object record of that exists, so
        only what narrows the allocators to one pod is used
        (docs/kernel-facts.md#pods):
        - a tmpfs mounted only in mount namespaces whose processes all run in one pod
          (a pod's /dev/shm, a tmpfs a container mounted), and elsewhere at most where
          the runtime keeps the sandbox's /dev/shm: only that pod writes it;
        - a SysV segment of a pod's own IPC namespace: only that pod can attach it.
          In the host's, an orphan's creator (cpid), while it lives, is already among
          its holders (add_sysv): usually the creator also touched the pages first.
        memfds and shared anonymous memory are left to their holders: their pages' memcgs
        are only visible page by page (/proc/kpagecgroup by PFN through pagemap), far too
        costly for a scan, and not at all for an fd-only memfd's unmapped pages.
        """
        ns_of = {pid: ns for ns, pids in self.mnt_ns.items() for pid in pids}
        for sb in self.superblocks.values():
            obj = self.objects.get(("tmpfs", sb.dev))
            if obj is None or obj.pod is not None:
                continue
            obj.pod = self.pod_of_mounts(sb, ns_of)
            if obj.pod is not None:
                obj.note = _joined(obj.note, "pod: mounted only in its containers")
        own_ipc = self.own_namespace("ipc")
        for key, obj in self.objects.items():
            ns = key[1]  # ("sysv", ipc namespace, shmid)
            if key[0] != "sysv" or not isinstance(ns, int) or ns == own_ipc or obj.pod:
                continue
            obj.pod = self.only_pod(self.ipc_ns.get(ns, ()))
            if obj.pod is not None:
                obj.note = _joined(obj.note, "pod: its IPC namespace")

    def pod_of_mounts(self, sb: _Superblock, ns_of: Mapping[int, int]) -> str | None:
        """The one pod whose containers' mount namespaces show `sb`, if no one else can
        write it: outside that pod it may be mounted only where the container runtime
        keeps a sandbox's /dev/shm (host/pod_shm.py), not at /dev/shm of the node."""
        pods: set[str] = set()
        for pid, mount in sb.mounts:
            ns = ns_of.get(pid)
            pod = None if ns is None else self.only_pod(self.mnt_ns[ns])
            if pod is not None:
                pods.add(pod)
            elif _SANDBOX_SHM.search(mount.mount_point) is None:
                return None
        return pods.pop() if len(pods) == 1 else None


# containerd: .../io.containerd.grpc.v1.cri/sandboxes/<id>/shm; CRI-O: .../<id>/userdata/shm
_SANDBOX_SHM = re.compile(r"/(?:sandboxes/[0-9a-f]{64}|[0-9a-f]{64}/userdata)/shm$")


def _joined(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def _superblock_name(scanner: _Scanner, sb: _Superblock) -> str:
    own = [m for pid, m in sb.mounts if pid in scanner.mnt_ns.get(scanner.own_mnt or -1, ())]
    mount = (own or [m for _pid, m in sb.mounts])[0]
    name = mount.mount_point if mount.root == "/" else f"{mount.mount_point} ({mount.root})"
    if not own:
        name += " (other mount namespace)"
    return name


def scan_node(paths: HostPaths | None = None) -> NodeScan:
    """One full attribution pass over the host: every process's fds and maps read."""
    return _scan(paths or HostPaths(), None)[0]


class ShmemTracker:
    """Attribution passes for a scanner that runs every cycle (the agent).

    A process seen in the last two passes whose fd count, RssShmem, VmSize, comm and
    parent are unchanged is not read again: what it held is stat'ed again (bytes are
    always fresh). What that cannot see (files closed and others opened at the same
    count, a same-size remap) waits for the next full pass, every `full_every` passes.
    """

    def __init__(self, paths: HostPaths | None = None, *, full_every: int = 10) -> None:
        self.paths = paths or HostPaths()
        self.full_every = max(1, full_every)
        self._memo: dict[int, _ProcessMemo] | None = None
        self._since_full = 0

    def scan(self) -> NodeScan:
        full = self._memo is None or self._since_full + 1 >= self.full_every
        scan, self._memo = _scan(self.paths, None if full else self._memo)
        self._since_full = 0 if full else self._since_full + 1
        return scan


def _scan(
    paths: HostPaths, previous: dict[int, _ProcessMemo] | None
) -> tuple[NodeScan, dict[int, _ProcessMemo]]:
    meminfo = read_meminfo(paths)
    scanner = _Scanner(paths, previous)
    scanner.read_processes()
    scanner.read_mounts()
    scanner.measure_superblocks()
    for pid in list(scanner.processes):
        scanner.scan_fds(pid)
    for pid in list(scanner.processes):
        scanner.scan_maps(pid)
    scanner.scan_sysv()
    scanner.finish_superblocks()
    scanner.pods_from_holders()
    scanner.pods_from_charge()
    objects = sorted(scanner.objects.values(), key=lambda obj: (-obj.bytes, obj.kind, obj.name))
    process_rss = sum(status.rss_bytes for status in scanner.processes.values())
    scan = NodeScan(
        full=previous is None,
        memory=breakdown(meminfo, process_rss),
        processes=scanner.processes,
        shmem=ShmemAttribution(
            total=meminfo["Shmem"],
            objects=objects,
            deleted_open_files=sorted(scanner.deleted.values(), key=lambda f: -f.bytes),
        ),
        unreadable=scanner.unreadable,
        vanished=scanner.vanished,
        open_tmpfs_files={
            key: [Holder(pid, comm) for pid, comm in holders.items()]
            for key, holders in scanner.open_tmpfs_files.items()
        },
        tmpfs_mounts=scanner.tmpfs_mounts(),
    )
    return scan, scanner.memo
