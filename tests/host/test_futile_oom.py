"""Futile OOM loops on real kernels (kubernetes#128339): a pod cgroup whose memory-backed
emptyDir takes 90 % of its limit. A tmpfs mounted at the pod's volume path holds a file
written from inside the container's cgroup (its pages are charged there and stay after
the writer exits); then a process that grows is OOM-killed, restarted, killed again.
The agent's cycle function (`OomLoopWatch.observe`, called by CycleMetrics every cycle)
runs before the first kill and after each one: flagged first with the file named, the
kills then counted as a loop. v1 on the host, v2 in the guest (TCG).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from memcg_helpers import joining, make_v2_cgroup

from nodemem.host.memcg import FutileMemcg, OomLoopWatch
from nodemem.host.paths import HostPaths
from nodemem.host.shmem import scan_node
from nodemem.host.vmstat import read_pressure_lines

pytestmark = pytest.mark.privileged

MiB = 1 << 20
LIMIT = 128 * MiB
FILE_MIB = 116  # 90.6 % of the limit; the grower's interpreter still fits beside it
# Grows by 1 MiB (every page touched) until the memcg OOM killer takes it.
GROWER = """
held = []
while True:
    chunk = bytearray(1 << 20)
    for i in range(0, len(chunk), 4096):
        chunk[i] = 1
    held.append(chunk)
"""


def _container_id() -> str:
    return secrets.token_hex(32)


def _run_in(cgroup: Path, *argv: str) -> subprocess.Popen[bytes]:
    # preexec_fn is unsafe with threads; this test process starts none.
    return subprocess.Popen(argv, preexec_fn=joining(cgroup))  # noqa: PLW1509


def _fill(container: Path, file: Path) -> None:
    """The emptyDir file, written by a process inside the container's cgroup."""
    writer = _run_in(
        container, "dd", "if=/dev/zero", f"of={file}", "bs=1M", f"count={FILE_MIB}", "status=none"
    )
    assert writer.wait(timeout=60) == 0


def _grow_until_killed(container: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    grower = _run_in(container, sys.executable, "-I", "-S", "-c", GROWER)
    processes.append(grower)
    assert grower.wait(timeout=120) == -9  # SIGKILL: the memcg OOM killer


def _only(futile: list[FutileMemcg], pod: str) -> FutileMemcg:
    assert [f.path.rsplit("/", 1)[-1] for f in futile] == [pod], futile
    return futile[0]


def _flagged_with_the_file(memcg: FutileMemcg, uid: str, volume: Path, file: Path) -> None:
    assert memcg.pod_uid == uid
    assert memcg.limit == LIMIT
    assert memcg.usage >= 0.9 * LIMIT
    assert memcg.shmem >= FILE_MIB * MiB
    assert memcg.freeable == memcg.usage - memcg.shmem < 12 * MiB
    names = [(h.kind, h.name) for h in memcg.holders]
    assert ("tmpfs", str(volume)) in names
    assert ("file", str(file)) in names
    assert next(h.bytes for h in memcg.holders if h.name == str(file)) == FILE_MIB * MiB


def _volume(tmp_path: Path, uid: str, mount_tmpfs: Callable[..., Path]) -> Path:
    at = tmp_path / "pods" / uid / "volumes" / "kubernetes.io~empty-dir" / "cache"
    return mount_tmpfs(options="size=256m", at=at)


def test_v1_futile_pod_flagged_then_its_kills_counted_as_a_loop(
    memcg_root: Path,
    mount_tmpfs: Callable[..., Path],
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    uid = str(uuid.uuid4())
    pod = memcg_root / "kubepods" / "burstable" / f"pod{uid}"
    container = pod / _container_id()
    container.mkdir(parents=True)
    (pod / "memory.limit_in_bytes").write_text(str(LIMIT))
    volume = _volume(tmp_path, uid, mount_tmpfs)
    file = volume / "fill"
    _fill(container, file)
    watch = OomLoopWatch()

    first = _only(watch.observe(HostPaths(), scan_node(), memcg_root), pod.name)
    _flagged_with_the_file(first, uid, volume, file)
    assert (first.oom_kills, first.loop_kills) == (0, 0)

    _grow_until_killed(container, processes)
    after_one = _only(watch.observe(HostPaths(), scan_node(), memcg_root), pod.name)
    assert (after_one.oom_kills, after_one.loop_kills, after_one.looping) == (1, 1, False)

    _grow_until_killed(container, processes)  # restarted: killed again, the file still there
    after_two = _only(watch.observe(HostPaths(), scan_node(), memcg_root), pod.name)
    assert (after_two.oom_kills, after_two.loop_kills, after_two.looping) == (2, 2, True)
    _flagged_with_the_file(after_two, uid, volume, file)


@pytest.mark.guest_v2
def test_v2_futile_pod_flagged_then_kills_of_restarted_containers_counted(
    v2_root: Path,
    mount_tmpfs: Callable[..., Path],
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    uid = str(uuid.uuid4())
    slice_name = f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    pod = make_v2_cgroup(v2_root, f"kubepods.slice/kubepods-burstable.slice/{slice_name}")
    (pod / "memory.max").write_text(str(LIMIT))
    container = make_v2_cgroup(pod, f"cri-containerd-{_container_id()}.scope")
    volume = _volume(tmp_path, uid, mount_tmpfs)
    file = volume / "fill"
    _fill(container, file)
    watch = OomLoopWatch()

    first = _only(watch.observe(HostPaths(), scan_node(), v2_root), pod.name)
    _flagged_with_the_file(first, uid, volume, file)
    assert (first.oom_kills, first.loop_kills) == (0, 0)

    _grow_until_killed(container, processes)
    after_one = _only(watch.observe(HostPaths(), scan_node(), v2_root), pod.name)
    assert (after_one.oom_kills, after_one.loop_kills) == (1, 1)

    # The restart, as kubelet does it: a new container cgroup, the old one removed. Its
    # tmpfs pages stay charged (to the removed memcg, still inside the pod's), and v2
    # counted its kill in the pod's memory.events too.
    os.rmdir(container)
    restarted = make_v2_cgroup(pod, f"cri-containerd-{_container_id()}.scope")
    _grow_until_killed(restarted, processes)
    after_two = _only(watch.observe(HostPaths(), scan_node(), v2_root), pod.name)
    assert (after_two.oom_kills, after_two.loop_kills, after_two.looping) == (2, 2, True)
    _flagged_with_the_file(after_two, uid, volume, file)
    assert "oom_kill 2" in (pod / "memory.events").read_text()


@pytest.mark.guest_v2
def test_v2_guest_kernel_has_memory_pressure() -> None:
    """Debian's 6.1 has PSI on by default; the report's memory.pressure reads it."""
    lines = read_pressure_lines(HostPaths())
    assert lines is not None and set(lines) == {"some", "full"}
    assert lines["some"].total_us >= lines["full"].total_us >= 0
