"""Pod identity and memory per pod on a real cgroup-v2 kernel (the guest tier).

Each test builds kubelet's layouts (systemd and cgroupfs drivers) under its own
/sys/fs/cgroup/nodemem-test-<hex>, moves real processes in, and reads them back through
the product's functions. Figures inside the guest are TCG figures.
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

from nodemem.host.identity import read_identity
from nodemem.host.paths import HostPaths
from nodemem.host.podmem import read_pod_memory
from samples import exec_done

pytestmark = [pytest.mark.privileged, pytest.mark.guest_v2]

MiB = 1 << 20


LAYOUTS = {
    "systemd-containerd-burstable": (
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/"
        "cri-containerd-{cid}.scope",
        "Burstable",
    ),
    "systemd-crio-besteffort": (
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/"
        "crio-{cid}.scope",
        "BestEffort",
    ),
    "systemd-docker-guaranteed": (
        "kubepods.slice/kubepods-pod{uid_}.slice/docker-{cid}.scope",
        "Guaranteed",
    ),
    "cgroupfs-burstable": ("kubepods/burstable/pod{uid}/{cid}", "Burstable"),
    "cgroupfs-guaranteed": ("kubepods/pod{uid}/{cid}", "Guaranteed"),
}


def test_identity_of_processes_in_every_v2_layout(
    v2_root: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    # One guest run for all layouts: each costs a mkdir chain and one sleep.
    expected = {}
    for name, (layout, qos) in LAYOUTS.items():
        uid = str(uuid.uuid4())
        cid = secrets.token_hex(32)
        relative = f"{name}/" + layout.format(uid=uid, uid_=uid.replace("-", "_"), cid=cid)
        cgroup = make_v2_cgroup(v2_root, relative)
        process = subprocess.Popen(["sleep", "600"], preexec_fn=joining(cgroup))  # noqa: PLW1509
        processes.append(process)
        exec_done(process.pid, ["sleep", "600"])
        expected[process.pid] = (f"/{v2_root.name}/{relative}", uid, cid, qos)

    for pid, (path, uid, cid, qos) in expected.items():
        identity = read_identity(HostPaths(), pid)
        assert identity.cgroup_lines[0].hierarchy_id == 0  # pure v2: the 0:: line only
        assert identity.cgroup == path
        assert (identity.pod_uid, identity.container_id, identity.qos_class) == (uid, cid, qos)

    found = {m.uid: m.qos_class for m in read_pod_memory(HostPaths(), v2_root)}
    assert found == {uid: qos for _path, uid, _cid, qos in expected.values()}


# argv: anon bytes to hold, a tmpfs file to write ("" none) and its size; "ready" once
# every page is touched, then holds until killed.
WORKER = """
import sys, time
anon, path, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
held = bytearray(anon)
for i in range(0, anon, 4096):
    held[i] = 1
if path:
    with open(path, "wb") as file:
        for _ in range(size >> 20):
            file.write(b"\\xa5" * (1 << 20))
print("ready", flush=True)
sys.stdin.read()
"""


def _worker(
    processes: list[subprocess.Popen[bytes]], cgroup: Path, anon: int, path: str = "", size: int = 0
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(anon), path, str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=joining(cgroup),  # noqa: PLW1509  # no threads in this test process
    )
    processes.append(process)
    return process


def test_pod_memory_from_a_real_v2_pod_cgroup(
    v2_root: Path, processes: list[subprocess.Popen[bytes]], mount_tmpfs: Callable[..., Path]
) -> None:
    uid = str(uuid.uuid4())
    pod = make_v2_cgroup(v2_root, f"kubepods/burstable/pod{uid}")
    (pod / "memory.max").write_text(str(256 * MiB))
    app = make_v2_cgroup(pod, secrets.token_hex(32))
    point = mount_tmpfs("emptydir", "size=64m")
    worker = _worker(processes, app, 16 * MiB, str(point / "data"), 8 * MiB)
    assert worker.stdout is not None and worker.stdout.readline() == b"ready\n"

    [memory] = read_pod_memory(HostPaths(), v2_root)

    assert (memory.uid, memory.qos_class, memory.directory) == (uid, "Burstable", pod)
    assert memory.limit_bytes == 256 * MiB
    assert abs(memory.memory_bytes - int((pod / "memory.current").read_text())) < MiB
    # the tmpfs file written from the container is charged to it, so to the pod
    assert 8 * MiB <= memory.shmem_bytes < 9 * MiB
    assert 16 * MiB <= memory.anon_bytes < 16 * MiB + 24 * MiB  # + the interpreter
    assert memory.file_bytes >= memory.shmem_bytes
    assert memory.oom_kills == 0
    if (pod / "memory.pressure").exists():  # PSI compiled in and enabled
        assert memory.pressure_some_10s is not None and memory.pressure_some_10s >= 0

    # A second container over its own limit: the kernel kills it, and the pod, the
    # container's parent, counts the kill (v2 memory.events are hierarchical).
    greedy = make_v2_cgroup(pod, secrets.token_hex(32))
    (greedy / "memory.max").write_text(str(32 * MiB))
    if (greedy / "memory.swap.max").exists():  # no swapping out instead of the kill
        (greedy / "memory.swap.max").write_text("0")
    victim = _worker(processes, greedy, 96 * MiB)
    assert victim.wait(timeout=120) == -9  # SIGKILL from the memcg OOM killer

    [after] = read_pod_memory(HostPaths(), v2_root)
    assert after.oom_kills == 1
    assert "oom_kill 1" in (pod / "memory.events").read_text().splitlines()
    assert os.path.exists(f"/proc/{worker.pid}")  # the other container lives on
    assert after.shmem_bytes >= 8 * MiB  # the tmpfs file outlives the kill
