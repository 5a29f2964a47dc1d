"""The /dev/shm tmpfs of pods, found from their processes.

containerd and CRI-O give each pod sandbox one tmpfs (64 MiB by default: containerd in
its state directory, `.../sandboxes/<id>/shm`, CRI-O in its storage directory,
`.../userdata/shm`) and bind-mount it at /dev/shm in every container of the pod, each in
its own mount namespace. So a pod's /dev/shm is found from one of its processes: the
cgroup path names the pod (host.identity), `/proc/PID/mountinfo` the superblock at
/dev/shm, and `/proc/PID/root/dev/shm` reaches it, which is where a limit is applied
(a tmpfs_limits.Target with namespace_pid=PID). Each mount namespace is read once, and
each superblock is one PodShm however many containers show it.

Not a pod's own tmpfs, and so never a target here: a /dev/shm that is the node's own
(a hostIPC pod sees the host's /dev/shm), and a memory-backed emptyDir mounted at
/dev/shm (kubelet mounted it at its volume path; it is sized as that volume).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from nodemem.host.identity import read_pod_cgroup
from nodemem.host.mounts import Mount, MountinfoError
from nodemem.host.paths import HostPaths
from nodemem.host.pods import PodVolume, pod_volume_from_path
from nodemem.host.procfs import ProcessGone, ProcessUnreadable, list_pids
from nodemem.host.tmpfs_limits import (
    Target,
    host_namespace_pid,
    namespace_mounts,
    top_mount_at,
)

DEV_SHM = "/dev/shm"
_EMPTY_DIR = "kubernetes.io~empty-dir"
_SKIPPED = (ProcessGone, ProcessUnreadable, MountinfoError, OSError)


@dataclass(frozen=True)
class PodShm:
    """One superblock at /dev/shm of a pod's containers."""

    pod_uid: str
    target: Target  # in the mount namespace of the pod's lowest pid showing it
    namespace: int  # inode of that mount namespace
    # Why it is not the pod's own tmpfs (then not to be limited here), or None.
    not_pod_shm: str | None = None
    # False while it may still change: no mount at /dev/shm, or the node's /dev/shm, as a
    # namespace shows before the runtime has bind-mounted the sandbox's tmpfs there.
    settled: bool = True

    @property
    def dev(self) -> int | None:
        return None if self.target.mount is None else self.target.mount.dev


def pod_processes(paths: HostPaths, pids: Iterable[int] | None = None) -> dict[str, list[int]]:
    """Pod UID -> the pids of its container processes, ascending (one cgroup read each).

    Processes in a pod's cgroup but in no container (CRI-O's conmon) are left out: they
    run in the host's mount namespace. Processes that exit or refuse are skipped.
    """
    found: defaultdict[str, list[int]] = defaultdict(list)
    for pid in sorted(list_pids(paths) if pids is None else pids):
        try:
            pod = read_pod_cgroup(paths, pid)
        except _SKIPPED:
            continue
        if pod.pod_uid is not None and pod.container_id is not None:
            found[pod.pod_uid].append(pid)
    return dict(found)


def mount_namespace(paths: HostPaths, pid: int | None) -> int:
    """Inode of the mount namespace of `pid` (None: ours). Raises OSError."""
    return os.stat(paths.proc("self" if pid is None else pid, "ns", "mnt")).st_ino


def host_mount_namespace(paths: HostPaths) -> int | None:
    """Inode of the host root's mount namespace; None when it cannot be read (a PID 1
    that refuses even root, as on some VM sandboxes). Processes are then not passed
    over by namespace: the node's /dev/shm is still told by its superblock."""
    try:
        return mount_namespace(paths, host_namespace_pid(paths))
    except OSError:
        return None


def find_pod_shm(paths: HostPaths, pods: Mapping[str, Collection[int]]) -> list[PodShm]:
    """The /dev/shm superblocks of `pods` (UID -> pids, as pod_processes gives them).

    A pod yields one PodShm per distinct superblock its containers show (usually one:
    the sandbox tmpfs); a process in the host's mount namespace is not a container and
    is passed over. Sorted by pod UID, then pid.
    """
    host_mounts = namespace_mounts(paths, host_namespace_pid(paths))
    host_namespace = host_mount_namespace(paths)
    node_shm = top_mount_at(host_mounts, DEV_SHM)
    volumes = _volumes_by_dev(host_mounts)
    found: list[PodShm] = []
    for uid in sorted(pods):
        seen_namespaces: set[int] = set()
        seen_devs: set[int | None] = set()
        for pid in sorted(pods[uid]):
            try:
                namespace = mount_namespace(paths, pid)
            except OSError:
                continue
            if namespace == host_namespace or namespace in seen_namespaces:
                continue
            seen_namespaces.add(namespace)
            try:
                mount = top_mount_at(namespace_mounts(paths, pid), DEV_SHM)
            except _SKIPPED:
                continue
            dev = None if mount is None else mount.dev
            if dev in seen_devs:
                continue
            seen_devs.add(dev)
            target = Target(DEV_SHM, paths.in_namespace_of(pid, DEV_SHM), mount, pid)
            reason = _not_pod_shm(mount, node_shm, volumes)
            settled = mount is not None and (node_shm is None or mount.dev != node_shm.dev)
            found.append(PodShm(uid, target, namespace, reason, settled))
    return found


def _volumes_by_dev(host_mounts: Iterable[Mount]) -> dict[int, PodVolume]:
    """Memory emptyDirs in the host's mount table, by superblock."""
    volumes: dict[int, PodVolume] = {}
    for mount in host_mounts:
        volume = pod_volume_from_path(mount.mount_point)
        if volume is not None and volume.plugin == _EMPTY_DIR and mount.fstype == "tmpfs":
            volumes.setdefault(mount.dev, volume)
    return volumes


def _not_pod_shm(
    mount: Mount | None, node_shm: Mount | None, volumes: Mapping[int, PodVolume]
) -> str | None:
    if mount is None:
        return None  # apply_limit says: not a mount point
    if node_shm is not None and mount.dev == node_shm.dev:
        return (
            f"{DEV_SHM} is the node's own {DEV_SHM} (hostIPC): not a pod's, not touched; "
            "limit it with a path item"
        )
    # The container's mountinfo may also show the volume path as the bind's root or source.
    volume = (
        volumes.get(mount.dev)
        or pod_volume_from_path(mount.root)
        or pod_volume_from_path(mount.source)
    )
    if volume is not None and volume.plugin == _EMPTY_DIR:
        return (
            f"{DEV_SHM} is the memory emptyDir {volume.volume!r}: sized through its volume "
            "(a path item with pods.volume), not as the pod's /dev/shm"
        )
    return None
