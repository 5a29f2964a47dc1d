"""Every kind of Shmem object this kernel can make is found, named and measured.

Each test creates ~32 MiB of one kind (docs/kernel-facts.md#shmem), scans, and checks
that the object appears with the right kind and bytes (within 1 %), and that the
node's unaccounted Shmem moved by less than 1 MiB: found, and not counted twice.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from nodemem.host.shmem import NodeScan, ShmemObject, scan_node

# guest_also: the same attribution on the guest's 6.1 kernel (cgroup v2).
pytestmark = [pytest.mark.privileged, pytest.mark.guest_also]

SIZE = 32 << 20
MiB = 1 << 20


def within_one_percent(actual: int, expected: int = SIZE) -> bool:
    return abs(actual - expected) <= expected // 100


def find(scan: NodeScan, predicate: Callable[[ShmemObject], bool]) -> ShmemObject:
    matches = [obj for obj in scan.shmem.objects if predicate(obj)]
    assert matches, f"not found among {[(o.kind, o.name, o.bytes) for o in scan.shmem.objects]}"
    assert len(matches) == 1, matches
    return matches[0]


def assert_accounted(before: NodeScan, after: NodeScan) -> None:
    """Shmem grew by what was created; the unaccounted remainder did not."""
    drift = after.shmem.unaccounted - before.shmem.unaccounted
    assert abs(drift) <= MiB, (
        f"unaccounted moved by {drift} bytes (Shmem {before.shmem.total} -> "
        f"{after.shmem.total}, attributed {before.shmem.attributed} -> {after.shmem.attributed})"
    )


def write_file(path: Path, size: int = SIZE) -> None:
    with open(path, "wb") as file:
        for _ in range(size // MiB):
            file.write(b"\xa5" * MiB)


def test_tmpfs_file_is_attributed_to_its_mount(mount_tmpfs) -> None:
    point = mount_tmpfs()
    before = scan_node()
    write_file(point / "data")
    after = scan_node()
    obj = find(after, lambda o: o.name == str(point))
    assert obj.kind == "tmpfs"
    assert within_one_percent(obj.bytes)
    assert_accounted(before, after)


def test_posix_shm_in_a_private_dev_shm(holder, tmp_path) -> None:
    before = scan_node()
    info = holder(
        "posix-shm-in-namespace", SIZE, prefix=("unshare", "-m", "--propagation", "private")
    )
    after = scan_node()
    obj = find(after, lambda o: info["pid"] in o.holders and o.kind == "tmpfs")
    assert obj.name == "/dev/shm (other mount namespace)"
    assert within_one_percent(obj.bytes)
    assert_accounted(before, after)


@pytest.mark.parametrize("kind", ["sysv", "sysv-orphan"])
def test_sysv_segment_attached_or_orphaned(holder, kind) -> None:
    before = scan_node()
    info = holder(kind, SIZE)
    after = scan_node()
    obj = find(after, lambda o: o.kind == "sysv" and o.name == f"shmid {info['shmid']}")
    assert within_one_percent(obj.bytes)
    if kind == "sysv":
        assert info["pid"] in obj.holders
        assert "orphan" not in obj.note
    else:
        assert obj.note.startswith("orphan: nattch 0")
    assert_accounted(before, after)


def test_sysv_segment_in_another_ipc_namespace(holder) -> None:
    before = scan_node()
    info = holder("sysv", SIZE, prefix=("unshare", "-i"))
    after = scan_node()
    obj = find(after, lambda o: o.kind == "sysv" and info["pid"] in o.holders)
    # A fresh IPC namespace numbers its segments from 0: the same shmid as the host's
    # first segment, told apart by the namespace.
    assert obj.name == f"shmid {info['shmid']}"
    assert "ipc namespace" in obj.note
    assert within_one_percent(obj.bytes)
    assert_accounted(before, after)


def test_memfd_held_by_fd(holder) -> None:
    before = scan_node()
    info = holder("memfd", SIZE, "nodemem-test-fd")
    after = scan_node()
    obj = find(after, lambda o: o.name == "memfd:nodemem-test-fd")
    assert obj.kind == "memfd"
    assert list(obj.holders) == [info["pid"]]
    assert within_one_percent(obj.bytes)
    assert_accounted(before, after)


def test_memfd_only_mapped(holder) -> None:
    before = scan_node()
    info = holder("memfd-mapped-only", SIZE, "nodemem-test-mapped")
    after = scan_node()
    obj = find(after, lambda o: o.name == "memfd:nodemem-test-mapped")
    assert obj.kind == "memfd"
    assert info["pid"] in obj.holders
    assert within_one_percent(obj.bytes)
    assert_accounted(before, after)


def test_shared_anonymous_memory(holder) -> None:
    before = scan_node()
    info = holder("shared-anon", SIZE)
    after = scan_node()
    obj = find(after, lambda o: o.kind == "sharedAnon" and info["pid"] in o.holders)
    assert obj.name == "/dev/zero"
    assert within_one_percent(obj.bytes)
    assert_accounted(before, after)


def test_deleted_but_open_file_is_listed_with_its_holder_and_counted_once(
    holder, mount_tmpfs
) -> None:
    point = mount_tmpfs()
    before = scan_node()
    info = holder("deleted-open", SIZE, str(point / "log"))
    after = scan_node()
    mount = find(after, lambda o: o.name == str(point))
    assert within_one_percent(mount.bytes)  # statfs already includes the unlinked file
    assert info["pid"] in mount.holders
    deleted = [f for f in after.shmem.deleted_open_files if f.pid == info["pid"]]
    assert [f.path for f in deleted] == [str(point / "log")]
    assert within_one_percent(deleted[0].bytes)
    assert_accounted(before, after)


def test_detached_tmpfs_pinned_by_an_open_file(holder, tmp_path) -> None:
    point = tmp_path / "detached"
    point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "nodemem-test", str(point)], check=True
    )
    try:
        before = scan_node()
        info = holder("open-file", SIZE, str(point / "pinned"))
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)  # detach; the fd pins it
    after = scan_node()
    obj = find(after, lambda o: o.kind == "detachedTmpfs" and info["pid"] in o.holders)
    assert within_one_percent(obj.bytes)
    assert_accounted(before, after)


def test_tmpfs_in_another_mount_namespace(holder, tmp_path) -> None:
    point = tmp_path / "private"
    point.mkdir()
    before = scan_node()
    holder(
        "tmpfs-in-namespace", SIZE, str(point), prefix=("unshare", "-m", "--propagation", "private")
    )
    after = scan_node()
    obj = find(after, lambda o: o.name == f"{point} (other mount namespace)")
    assert obj.kind == "tmpfs"
    assert within_one_percent(obj.bytes)
    assert_accounted(before, after)


def test_huge_page_tmpfs(mount_tmpfs) -> None:
    point = mount_tmpfs(options="size=64m,huge=always")
    before = scan_node()
    write_file(point / "data")
    after = scan_node()
    obj = find(after, lambda o: o.name == str(point))
    assert within_one_percent(obj.bytes)
    assert_accounted(before, after)


def test_unlimited_tmpfs_usage_comes_from_a_file_walk(holder, mount_tmpfs) -> None:
    point = mount_tmpfs(options="size=0")
    assert os.statvfs(point).f_blocks == 0  # statfs hides the usage of an unlimited tmpfs
    before = scan_node()
    write_file(point / "visible", SIZE // 2)
    info = holder("deleted-open", SIZE // 2, str(point / "unlinked"))
    after = scan_node()
    obj = find(after, lambda o: o.name == str(point))
    assert "unlimited" in obj.note
    assert within_one_percent(obj.bytes)  # the walked file plus the unlinked-but-open one
    assert info["pid"] in obj.holders
    assert_accounted(before, after)


def test_stacked_mounts_are_not_counted_twice(holder, mount_tmpfs, tmp_path) -> None:
    point = tmp_path / "stacked"
    lower = mount_tmpfs(at=point)
    before = scan_node()
    info = holder("open-file", SIZE, str(lower / "lower-data"))  # pins the lower superblock
    upper = mount_tmpfs(at=point)
    write_file(upper / "upper-data", 8 * MiB)
    after = scan_node()
    found = sorted((o for o in after.shmem.objects if o.name == str(point)), key=lambda o: o.bytes)
    assert len(found) == 2
    top, covered = found
    assert within_one_percent(top.bytes, 8 * MiB)
    # The lower superblock is out of reach by path; it is measured through the holder's fd.
    assert within_one_percent(covered.bytes, SIZE)
    assert "covered" in covered.note
    assert info["pid"] in covered.holders
    assert_accounted(before, after)


def test_covered_mount_without_a_pinning_file_is_flagged_not_misread(mount_tmpfs, tmp_path) -> None:
    point = tmp_path / "stacked"
    lower = mount_tmpfs(at=point)
    write_file(lower / "lower-data", 8 * MiB)
    upper = mount_tmpfs(at=point)
    write_file(upper / "upper-data", 4 * MiB)
    scan = scan_node()
    found = sorted((o for o in scan.shmem.objects if o.name == str(point)), key=lambda o: o.bytes)
    covered, top = found
    assert covered.bytes == 0
    assert "usage not reachable" in covered.note
    assert within_one_percent(top.bytes, 4 * MiB)  # the upper one, read once


def test_object_held_from_a_pod_cgroup_names_the_pod(holder, memcg_root) -> None:
    pod_uid = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
    cgroup = memcg_root / "kubepods" / "besteffort" / f"pod{pod_uid}" / ("ab" * 32)
    cgroup.mkdir(parents=True)
    info = holder("memfd", 4 * MiB, "nodemem-test-pod")
    (cgroup / "cgroup.procs").write_text(str(info["pid"]))
    try:
        obj = find(scan_node(), lambda o: o.name == "memfd:nodemem-test-pod")
        assert obj.pod == pod_uid
    finally:  # back out, so that the cgroup can be removed once the holder is gone
        (memcg_root.parent / "cgroup.procs").write_text(str(info["pid"]))
