"""Who a process is: comm, command line, executable, cgroup, and the pod behind it.

The pod and container come from the cgroup path, which kubelet and the container
runtime build in one of two shapes (cgroup driver "cgroupfs" or "systemd"), on
cgroup v1 or v2, under a configurable root:

    cgroupfs  /kubepods[/burstable|/besteffort]/pod<uid>/<container id>
    systemd   /kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_>.slice/
              <runtime>-<container id>.scope

Guaranteed pods sit directly under the kubepods level (no QoS level). systemd unit
names cannot hold "-" inside one name part, so the pod UID's dashes become "_".
Read from inside a cgroup namespace (containers on v2), the levels above the reader's
own cgroup show as "..", e.g. `/../../burstable/pod<uid>/<id>`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

from nodemem.host.paths import HostPaths
from nodemem.host.procfs import ProcessGone, parse_status, read_text

QosClass = Literal["Guaranteed", "Burstable", "BestEffort"]

_QOS_BY_LEVEL: dict[str, QosClass] = {"burstable": "Burstable", "besteffort": "BestEffort"}

# A pod UID: a UUID (dashes, or underscores in systemd names), or the 32 hex digits
# kubelet derives from a static pod's manifest.
_UID = (
    r"(?P<uid>[0-9a-f]{8}(?P<sep>[-_])[0-9a-f]{4}(?P=sep)[0-9a-f]{4}(?P=sep)[0-9a-f]{4}(?P=sep)"
    r"[0-9a-f]{12}|[0-9a-f]{32})"
)
_CGROUPFS_POD = re.compile(rf"pod{_UID}")
# Any prefix before "kubepods" covers kubelet's cgroup root as a slice,
# e.g. "kubelet-kubepods-burstable-pod<uid>.slice".
_SYSTEMD_POD = re.compile(rf"(?:.+-)?kubepods(?:-(?P<qos>burstable|besteffort))?-pod{_UID}\.slice")
# <64 hex>, <runtime>-<64 hex>, <runtime>-<64 hex>.scope (cri-containerd, docker, crio).
_CONTAINER = re.compile(r"(?:(?P<runtime>[a-z][a-z0-9-]*?)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?")
# containerd's "<slice>:<prefix>:<id>" form, seen when a systemd-driver path is shown as one name.
_SLICE_PREFIX_ID = re.compile(
    r"(?P<slice>[^:]+\.slice):(?P<runtime>[a-z0-9-]+):(?P<id>[0-9a-f]{64})"
)

PF_KTHREAD = 0x00200000  # include/linux/sched.h


class PodCgroup(NamedTuple):
    """What a cgroup path says about the pod; all None outside a pod."""

    pod_uid: str | None
    container_id: str | None
    qos_class: QosClass | None


class CgroupLine(NamedTuple):
    """One line of /proc/PID/cgroup: `hierarchy-id:controllers:path`."""

    hierarchy_id: int
    controllers: str  # "" for the v2 unified hierarchy, "memory", "name=systemd", ...
    path: str


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    comm: str
    cmdline: str  # arguments joined by spaces; "" for kernel threads and zombies
    exe: str | None  # None when unreadable (kernel threads, zombies, no permission)
    uid: int
    cgroup: str  # the path used for matching; see `matching_cgroup`
    cgroup_lines: tuple[CgroupLine, ...]
    pod_uid: str | None
    container_id: str | None
    qos_class: QosClass | None
    kthread: bool


_NO_POD = PodCgroup(None, None, None)


def parse_cgroup_path(path: str) -> PodCgroup:
    """Pod UID, container id and QoS class encoded in a cgroup path (either driver).

    The container id is the component right below the pod level, whatever lies deeper
    (sub-cgroups a container made itself). The sandbox ("pause") container is a
    container like any other here. CRI-O's `crio-conmon-<id>.scope` holds the monitor
    process, which belongs to the pod but to no container: container_id None.
    """
    parts = [part for part in path.split("/") if part]
    for index in range(len(parts)):
        found = _pod_level(parts, index)
        if found is None:
            continue
        pod_uid, qos, inline_container = found
        if inline_container is not None:
            return PodCgroup(pod_uid, inline_container, qos)
        below = parts[index + 1] if index + 1 < len(parts) else None
        return PodCgroup(pod_uid, _container_id(below), qos)
    return _NO_POD


def _pod_level(parts: list[str], index: int) -> tuple[str, QosClass | None, str | None] | None:
    """(pod uid, qos, container id given in the same name) when parts[index] is a pod level."""
    part = parts[index]
    inline_container: str | None = None
    slice_form = _SLICE_PREFIX_ID.fullmatch(part)
    if slice_form is not None:
        part, inline_container = slice_form["slice"], slice_form["id"]
    systemd = _SYSTEMD_POD.fullmatch(part)
    if systemd is not None:
        qos = _QOS_BY_LEVEL.get(systemd["qos"] or "", "Guaranteed")
        return systemd["uid"].replace("_", "-"), qos, inline_container
    cgroupfs = _CGROUPFS_POD.fullmatch(part)
    if cgroupfs is None or index == 0:
        return None
    # cgroupfs pod dirs are recognised only at their place in the tree, so that a
    # stray directory named pod<uuid> elsewhere is not taken for a pod. Read from inside
    # a cgroup namespace (an agent container on v2) the levels above the reader's own
    # cgroup show as "..": such an ancestor may be kubepods, a QoS level unknown.
    uid = cgroupfs["uid"].replace("_", "-")
    parent = parts[index - 1]
    grandparent = parts[index - 2] if index >= 2 else None
    if parent == "kubepods":
        return uid, "Guaranteed", None
    if parent in _QOS_BY_LEVEL and grandparent in ("kubepods", ".."):
        return uid, _QOS_BY_LEVEL[parent], None
    if parent == "..":
        return uid, None, None
    return None


def _container_id(name: str | None) -> str | None:
    if name is None:
        return None
    match = _CONTAINER.fullmatch(name)
    if match is None:
        return None
    runtime = match["runtime"] or ""
    if runtime.endswith("conmon"):
        return None
    return match["id"]


def parse_cgroup_file(text: str) -> tuple[CgroupLine, ...]:
    lines: list[CgroupLine] = []
    for line in text.splitlines():
        hierarchy, sep1, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep1 and sep2) or not hierarchy.isdigit():
            continue
        lines.append(CgroupLine(int(hierarchy), controllers, path))
    return tuple(lines)


def matching_cgroup(lines: tuple[CgroupLine, ...]) -> str:
    """The cgroup path that decides memory limits and OOM: the memory controller's.

    On a v1 or hybrid host that is the v1 `memory` line; the unified `0::` line there
    is systemd's tracking hierarchy without the memory controller (often just "/").
    On a pure v2 host the `0::` line is the only one and is used.
    """
    for line in lines:
        if line.hierarchy_id != 0 and "memory" in line.controllers.split(","):
            return line.path
    for line in lines:
        if line.hierarchy_id == 0 and line.controllers == "":
            return line.path
    return lines[0].path if lines else ""


def _pod_from_lines(chosen: str, lines: tuple[CgroupLine, ...]) -> PodCgroup:
    pod = parse_cgroup_path(chosen)
    if pod.pod_uid is not None:
        return pod
    # e.g. hybrid hosts where only some hierarchies carry kubelet's layout.
    for line in lines:
        pod = parse_cgroup_path(line.path)
        if pod.pod_uid is not None:
            return pod
    return _NO_POD


def read_pod_cgroup(paths: HostPaths, pid: int) -> PodCgroup:
    """The pod and container a process runs in, from its cgroup alone (cheap: one read)."""
    lines = parse_cgroup_file(read_text(paths, pid, "cgroup"))
    return _pod_from_lines(matching_cgroup(lines), lines)


def is_kernel_thread(paths: HostPaths, pid: int) -> bool:
    """PF_KTHREAD from /proc/PID/stat (every kernel; zombies are not kernel threads)."""
    stat = read_text(paths, pid, "stat")
    # comm (field 2) may contain spaces and parentheses: fields restart after the last ")".
    after_comm = stat[stat.rindex(")") + 2 :].split()
    flags = int(after_comm[6])  # field 9 of stat
    return bool(flags & PF_KTHREAD)


def _kthread_from_status(paths: HostPaths, pid: int, status: str) -> bool:
    for line in status.splitlines():
        if line.startswith("Kthread:"):  # 6.x kernels say it directly
            return line.split(":", 1)[1].strip() == "1"
    return is_kernel_thread(paths, pid)


def read_identity(paths: HostPaths, pid: int) -> ProcessIdentity:
    """Identity of one process. Raises procfs.ProcessGone / ProcessUnreadable.

    The files are read one after another; a process that exits half-way raises
    ProcessGone rather than yielding a half-filled identity.
    """
    status_text = read_text(paths, pid, "status")
    status = parse_status(pid, status_text)
    cmdline = read_text(paths, pid, "cmdline")
    cgroup_text = read_text(paths, pid, "cgroup")
    try:
        exe: str | None = os.readlink(paths.proc(pid, "exe"))
    except OSError as exc:
        if not paths.proc(pid).exists():
            raise ProcessGone(pid) from exc
        exe = None  # kernel threads and zombies have no exe (ENOENT); others may refuse
    lines = parse_cgroup_file(cgroup_text)
    chosen = matching_cgroup(lines)
    pod = _pod_from_lines(chosen, lines)
    return ProcessIdentity(
        pid=pid,
        comm=status.comm,
        cmdline=cmdline.rstrip("\0").replace("\0", " "),
        exe=exe,
        uid=status.uid,
        cgroup=chosen,
        cgroup_lines=lines,
        pod_uid=pod.pod_uid,
        container_id=pod.container_id,
        qos_class=pod.qos_class,
        kthread=_kthread_from_status(paths, pid, status_text),
    )
