"""Shmem attribution: which objects hold the node's Shmem, and who holds them.

kernel-memory.md §2 is the specification. No single method sees every object, so
five are combined, each keyed so that nothing is counted twice:

  tmpfs/devtmpfs superblocks of every mount namespace   statfs, keyed by st_dev
  detached or covered superblocks pinned by an fd/map   statfs through the fd
  SysV segments of every IPC namespace                  /proc/sysvipc/shm rss
  memfds and other objects on the internal shm_mnt      st_blocks, keyed (dev, ino)
  shared anonymous memory, mapped-only memfds           maps + map_files

Deleted-but-open files on a mounted tmpfs are already inside that tmpfs's statfs
figure: they are listed with their holder, never added again.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field

from nodemem.host.identity import read_pod_cgroup
from nodemem.host.meminfo import MemoryBreakdown, breakdown, read_meminfo
from nodemem.host.mounts import TMPFS_MAGIC, Mount, parse_mountinfo
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
from nodemem.host.statfs import statfs
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
    memory: MemoryBreakdown
    processes: dict[int, ProcStatus]
    shmem: ShmemAttribution
    unreadable: list[UnreadableProcess]
    vanished: int  # processes that exited during the scan
    # Files on tmpfs that some process holds open, (st_dev, st_ino) -> holders:
    # cleanup must not remove them (that frees nothing).
    open_tmpfs_files: dict[tuple[int, int], list[Holder]]

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


@dataclass
class _Superblock:
    dev: int
    mounts: list[tuple[int, Mount]]  # (pid of a reader in that namespace, mount)
    reachable_path: str | None = None
    used: int | None = None  # None: usage not reachable by path
    unlimited: bool = False


class _Scanner:
    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
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
        for name in os.listdir(self.paths.proc_root):
            if not name.isdigit():
                continue
            pid = int(name)
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
            for kind, table in (("mnt", self.mnt_ns), ("ipc", self.ipc_ns)):
                try:
                    ns = namespace_id(self.paths, pid, kind)
                except ProcessGone:
                    break
                except ProcessUnreadable as exc:
                    self.refused(pid, exc.what, exc.error.strerror or str(exc.error))
                    continue
                table[ns].append(pid)
                if kind == "ipc":
                    self.pid_ipc_ns[pid] = ns

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
                    mounts = parse_mountinfo(read_text(self.paths, pid, "mountinfo"))
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
                sb.used = walk_usage(path, sb.dev) if sb.unlimited else fs.used_bytes
                break

    # -- (b, d) open files ------------------------------------------------------------

    def scan_fds(self, pid: int) -> None:
        fd_dir = f"{self.paths.proc_root}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError as exc:
            self.fd_error(pid, exc)
            return
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
                    return
                continue
            self.classify_file(pid, holder, link, st, fd_path)

    def fd_error(self, pid: int, exc: OSError) -> bool:
        """Record a refusal; True when the whole process is unreadable or gone."""
        error = classify(pid, "fd", exc)
        if isinstance(error, ProcessUnreadable):
            self.refused(pid, "fd", exc.strerror or str(exc))
            return True
        return isinstance(error, ProcessGone)

    def classify_file(
        self, pid: int, holder: Holder, link: str, st: os.stat_result, via: str
    ) -> None:
        dev, ino = st.st_dev, st.st_ino
        if dev == self.shm_dev:
            self.add_shm_mnt_object(holder, link, st)
            return
        sb = self.superblocks.get(dev)
        if sb is not None:
            if not stat.S_ISREG(st.st_mode):
                return  # /dev/null and friends on devtmpfs hold no memory
            self.open_tmpfs_files[(dev, ino)][pid] = holder.comm
            if link.endswith(_DELETED) and stat.S_ISREG(st.st_mode):
                self.add_deleted(pid, holder, link, st)
            if sb.used is None:  # covered or otherwise unreachable: measure through the fd
                self.measure_through(sb, via)
            self.tmpfs_object(sb).add_holder(holder)
            return
        if dev in self.all_devs:
            return
        fs_type = self.foreign_type(dev, via)
        if fs_type == TMPFS_MAGIC:
            self.add_detached(holder, link, st, via)

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
            sb.used = fs.used_bytes
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
        try:
            mappings = file_mappings(read_text(self.paths, pid, "maps"), self.boring_map_devs)
        except ProcessGone:
            return
        except ProcessUnreadable as exc:
            self.refused(pid, "maps", exc.error.strerror or str(exc.error))
            return
        holder = self.holder(pid)
        seen: set[tuple[int, int]] = set()
        for mapping in mappings:
            if mapping.path.startswith("/SYSV"):
                self.note_sysv_attach(pid, holder, mapping.dev, mapping.inode)
                continue
            key = (mapping.dev, mapping.inode)
            if key in seen:
                continue
            seen.add(key)
            if not self.needs_stat(holder, mapping.dev, key, mapping.path):
                continue
            via = f"{self.paths.proc_root}/{pid}/map_files/{mapping.range_name}"
            try:
                st = os.stat(via)
            except OSError as exc:
                error = classify(pid, "map_files", exc)
                if isinstance(error, ProcessUnreadable):
                    self.refused(pid, "map_files", exc.strerror or str(exc))
                if isinstance(error, ProcessUnreadable | ProcessGone):
                    return
                continue
            self.classify_file(pid, holder, mapping.path, st, via)

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

    def pods_from_holders(self) -> None:
        """An object whose holders all run in one pod belongs to that pod."""
        pod_of: dict[int, str | None] = {}
        for obj in self.objects.values():
            if obj.pod is not None or not obj.holders:
                continue
            for pid in obj.holders:
                if pid not in pod_of:
                    try:
                        pod_of[pid] = read_pod_cgroup(self.paths, pid).pod_uid
                    except (ProcessGone, ProcessUnreadable):
                        pod_of[pid] = None
            pods = {pod_of[pid] for pid in obj.holders}
            if len(pods) == 1:
                obj.pod = pods.pop()


def _superblock_name(scanner: _Scanner, sb: _Superblock) -> str:
    own = [m for pid, m in sb.mounts if pid in scanner.mnt_ns.get(scanner.own_mnt or -1, ())]
    mount = (own or [m for _pid, m in sb.mounts])[0]
    name = mount.mount_point if mount.root == "/" else f"{mount.mount_point} ({mount.root})"
    if not own:
        name += " (other mount namespace)"
    return name


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


def scan_node(paths: HostPaths | None = None) -> NodeScan:
    """One full attribution pass over the host."""
    paths = paths or HostPaths()
    meminfo = read_meminfo(paths)
    scanner = _Scanner(paths)
    scanner.read_processes()
    scanner.read_mounts()
    scanner.measure_superblocks()
    for pid in list(scanner.processes):
        scanner.scan_fds(pid)
    for pid, status in list(scanner.processes.items()):
        # RssShmem > 0 is the cheap pre-filter for processes with shmem mappings.
        if status.rss_shmem_bytes > 0:
            scanner.scan_maps(pid)
    scanner.scan_sysv()
    scanner.finish_superblocks()
    scanner.pods_from_holders()
    objects = sorted(scanner.objects.values(), key=lambda obj: (-obj.bytes, obj.kind, obj.name))
    process_rss = sum(status.rss_bytes for status in scanner.processes.values())
    return NodeScan(
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
    )
