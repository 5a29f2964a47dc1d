"""Memory per pod, read from the pod cgroups kubelet makes (both drivers, v1 and v2).

A pod cgroup (`.../kubepods[-<qos>]-pod<uid>.slice`, `.../kubepods[/<qos>]/pod<uid>`)
holds the pod's containers, so its counters are the pod's: the kernel charges every
page to the memcg of the task that allocated it and counts it in all its ancestors.

    figure       v2 (unified)                 v1 (memory controller)
    memory       memory.current               memory.usage_in_bytes
    limit        memory.max ("max": none)     memory.limit_in_bytes (PAGE_COUNTER_MAX: none)
    anon         memory.stat anon             memory.stat total_rss
    file         memory.stat file             memory.stat total_cache
    shmem        memory.stat shmem            memory.stat total_shmem
    oom kills    memory.events oom_kill       memory.oom_control oom_kill, summed below
    pressure     memory.pressure some avg10   none

v2's memory.stat and memory.events count the whole subtree; v1's memory.events are
local to each memcg (docs/kernel-facts.md#memory-per-pod), so a v1 pod's kills are summed
over its live cgroups, and a deleted container cgroup takes its count with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nodemem.host.identity import PodCgroup, QosClass, parse_cgroup_path
from nodemem.host.memcg import flat_keyed, read_value, v1_oom_kills
from nodemem.host.oom_predict import memory_cgroup_dir
from nodemem.host.paths import HostPaths

# page_counter's "no limit": PAGE_COUNTER_MAX pages (LONG_MAX / PAGE_SIZE) in bytes.
_PAGE = os.sysconf("SC_PAGE_SIZE")
_V1_UNLIMITED = (2**63 - 1) // _PAGE * _PAGE

# The pod level is 1-4 levels below the hierarchy root on real nodes (deeper with a
# kubelet --cgroup-root or kind-style nesting); the walk stops descending below this.
MAX_DEPTH = 7


@dataclass(frozen=True)
class PodMemory:
    uid: str
    qos_class: QosClass | None  # None only when a cgroup namespace hides the QoS level
    directory: Path  # the pod cgroup, as reachable from here
    memory_bytes: int
    limit_bytes: int | None  # None: unlimited
    anon_bytes: int
    file_bytes: int  # page cache, tmpfs and shmem included (both versions)
    shmem_bytes: int
    oom_kills: int | None  # None: the kernel does not count them (v1 before 4.13)
    pressure_some_10s: float | None  # None: v1, or PSI disabled (psi=0)


def pod_cgroups(root: Path) -> Iterator[tuple[Path, PodCgroup]]:
    """Every pod cgroup below `root` (a cgroup directory), with what its path says.

    The walk never enters a pod cgroup (its containers are counted in it) nor a
    container cgroup of containerd's `<slice>:<prefix>:<id>` form, which has no pod
    level of its own.
    """
    stack: list[tuple[Path, str, int]] = [(root, "", 0)]
    while stack:
        directory, relative, depth = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:  # removed meanwhile, or not readable
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            path = f"{relative}/{entry.name}"
            pod = parse_cgroup_path(path)
            if pod.pod_uid is None:
                if depth + 1 < MAX_DEPTH:
                    stack.append((Path(entry.path), path, depth + 1))
            elif pod.container_id is None:
                yield Path(entry.path), pod


def read_pod_memory(paths: HostPaths, root: Path | None = None) -> list[PodMemory]:
    """The memory of every pod on the host, largest first.

    `root`: where to walk (a directory in the memory hierarchy); default the whole
    memory hierarchy of the host. No memory hierarchy: no pods.
    """
    if root is None:
        try:
            _scope, root, _mount = memory_cgroup_dir(paths, "/")
        except (LookupError, OSError):
            return []
    found: dict[str, PodMemory] = {}
    for directory, pod in pod_cgroups(root):
        assert pod.pod_uid is not None
        if pod.pod_uid in found:
            continue  # the same pod twice (e.g. a leftover cgroup): the first wins
        try:
            memory = _read_one(directory, pod.pod_uid, pod.qos_class)
        except (OSError, ValueError):
            continue  # the pod went away while it was read
        found[pod.pod_uid] = memory
    return sorted(found.values(), key=lambda m: (-m.memory_bytes, m.uid))


def _read_one(directory: Path, uid: str, qos: QosClass | None) -> PodMemory:
    if (directory / "memory.current").exists():
        stat = flat_keyed(directory / "memory.stat")
        return PodMemory(
            uid=uid,
            qos_class=qos,
            directory=directory,
            memory_bytes=int(read_value(directory / "memory.current")),
            limit_bytes=_v2_limit(read_value(directory / "memory.max")),
            anon_bytes=stat.get("anon", 0),
            file_bytes=stat.get("file", 0),
            shmem_bytes=stat.get("shmem", 0),
            oom_kills=flat_keyed(directory / "memory.events").get("oom_kill"),
            pressure_some_10s=_pressure_some_avg10(directory / "memory.pressure"),
        )
    stat = flat_keyed(directory / "memory.stat")
    limit = int(read_value(directory / "memory.limit_in_bytes"))
    return PodMemory(
        uid=uid,
        qos_class=qos,
        directory=directory,
        memory_bytes=int(read_value(directory / "memory.usage_in_bytes")),
        limit_bytes=None if limit >= _V1_UNLIMITED else limit,
        # total_*: the whole subtree; the plain keys count only the pod cgroup's own tasks.
        anon_bytes=stat.get("total_rss", stat.get("rss", 0)),
        file_bytes=stat.get("total_cache", stat.get("cache", 0)),
        shmem_bytes=stat.get("total_shmem", stat.get("shmem", 0)),
        oom_kills=v1_oom_kills(directory),
        pressure_some_10s=None,
    )


def _v2_limit(text: str) -> int | None:
    return None if text == "max" else int(text)


def _pressure_some_avg10(file: Path) -> float | None:
    """`some avg10=0.00 avg60=...` → 0.0; None when PSI is off (no file, or EOPNOTSUPP)."""
    try:
        text = read_value(file)
    except OSError:
        return None
    for line in text.splitlines():
        kind, *fields = line.split()
        if kind == "some":
            for field in fields:
                name, _, value = field.partition("=")
                if name == "avg10":
                    return float(value)
    return None
