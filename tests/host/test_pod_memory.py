"""Memory per pod on a real v1 memory cgroup laid out as kubelet's (cgroupfs driver),
under this test's own memcg; and the pod a Shmem object's pages are charged to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Holder
from nodemem.host.paths import HostPaths
from nodemem.host.podmem import PodMemory, read_pod_memory
from nodemem.host.shmem import ShmemObject, scan_node

pytestmark = pytest.mark.privileged

MiB = 1 << 20
CID = "ab" * 32

# argv: anon bytes to hold, a file to write on a tmpfs and its size. Answers "ready"
# once every page is touched (charged to its memcg), then holds until stdin closes.
WORKER = """
import sys
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


def _pod_cgroup(memcg_root: Path, uid: str) -> Path:
    container = memcg_root / "kubepods" / "burstable" / f"pod{uid}" / CID
    container.mkdir(parents=True)
    return container.parent


def _start(
    processes: list[subprocess.Popen[bytes]], cgroup: Path, *args: str
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=_join(cgroup),  # noqa: PLW1509  # no threads in this test process
    )
    processes.append(process)
    return process


def _join(cgroup: Path) -> Callable[[], None]:
    def join() -> None:
        with open(cgroup / "cgroup.procs", "w") as procs:
            procs.write(str(os.getpid()))

    return join


def _only(memcg_root: Path) -> PodMemory:
    [pod] = read_pod_memory(HostPaths(), memcg_root)
    return pod


def test_pod_memory_of_a_v1_pod_cgroup(
    memcg_root: Path, processes: list[subprocess.Popen[bytes]], mount_tmpfs: Callable[..., Path]
) -> None:
    uid = str(uuid.uuid4())
    pod = _pod_cgroup(memcg_root, uid)
    (pod / "memory.limit_in_bytes").write_text(str(512 * MiB))
    point = mount_tmpfs("podvolume", "size=64m")
    worker = _start(processes, pod / CID, str(32 * MiB), str(point / "data"), str(8 * MiB))
    assert worker.stdout is not None and worker.stdout.readline() == b"ready\n"

    memory = _only(memcg_root)

    assert (memory.uid, memory.qos_class, memory.directory) == (uid, "Burstable", pod)
    assert memory.limit_bytes == 512 * MiB
    # the tmpfs file's pages are charged to the writer's memcg, counted in the pod's
    assert 8 * MiB <= memory.shmem_bytes < 9 * MiB
    assert 32 * MiB <= memory.anon_bytes < 32 * MiB + 24 * MiB  # + the interpreter
    assert memory.file_bytes >= memory.shmem_bytes
    assert memory.memory_bytes >= memory.anon_bytes + memory.shmem_bytes
    assert memory.oom_kills == 0
    assert memory.pressure_some_10s is None  # v1 has none


def test_v1_pod_counts_the_oom_kills_of_its_containers(
    memcg_root: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    uid = str(uuid.uuid4())
    pod = _pod_cgroup(memcg_root, uid)
    container = pod / CID
    (container / "memory.limit_in_bytes").write_text(str(48 * MiB))
    worker = _start(processes, container, str(96 * MiB), "", "0")  # more than its limit
    assert worker.wait(timeout=60) == -9  # SIGKILL from the memcg OOM killer

    # v1 counts the kill in the victim's memcg only, not in the pod's
    assert "oom_kill 1" in (container / "memory.oom_control").read_text()
    assert "oom_kill 0" in (pod / "memory.oom_control").read_text()
    assert _only(memcg_root).oom_kills == 1


def _in_cgroup(cgroup: Path, *then: str) -> tuple[str, ...]:
    """A command prefix that moves itself into `cgroup`, then execs `then` + the holder."""
    return ("sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *then)


def _object(predicate: Callable[[ShmemObject], bool]) -> ShmemObject:
    return next(obj for obj in scan_node().shmem.objects if predicate(obj))


def test_a_tmpfs_only_a_pod_mounts_gets_the_pod(
    memcg_root: Path, holder: Holder, tmp_path: Path
) -> None:
    uid = str(uuid.uuid4())
    container = _pod_cgroup(memcg_root, uid) / CID
    point = tmp_path / "in-pod"
    point.mkdir()
    # A tmpfs only the pod's mount namespace has, its file closed: no holder names a pod.
    holder(
        "tmpfs-in-namespace",
        4 * MiB,
        str(point),
        prefix=_in_cgroup(container, "unshare", "-m", "--propagation", "private"),
    )

    tmpfs = _object(lambda o: o.name == f"{point} (other mount namespace)")

    assert tmpfs.holders == {}
    assert tmpfs.pod == uid
    assert "pod: mounted only in its containers" in tmpfs.note


def test_a_tmpfs_the_host_mounts_gets_no_pod(
    memcg_root: Path, processes: list[subprocess.Popen[bytes]], mount_tmpfs: Callable[..., Path]
) -> None:
    container = _pod_cgroup(memcg_root, str(uuid.uuid4())) / CID
    point = mount_tmpfs("shared")
    # A pod's process wrote the file (its pages are charged to the pod) and closed it, but
    # any host process could have written there as well: not known, not guessed.
    worker = _start(processes, container, "0", str(point / "data"), str(4 * MiB))
    assert worker.stdout is not None and worker.stdout.readline() == b"ready\n"

    obj = _object(lambda o: o.name == str(point))

    assert (obj.holders, obj.pod) == ({}, None)


HOLDER = Path(__file__).with_name("shmem_holder.py")


def test_an_orphan_segment_of_a_pod_ipc_namespace_gets_the_pod(
    memcg_root: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    uid = str(uuid.uuid4())
    container = _pod_cgroup(memcg_root, uid) / CID
    # In the pod's cgroup and a new IPC namespace: the holder creates a segment, detaches
    # and exits; a sleep (the pause container's part) keeps the namespace alive.
    script = (  # fmt: skip
        'echo $$ > "$0" && exec unshare -i sh -c "$1 $2 sysv-orphan $3; exec sleep 600" sh "$@"'
    )
    keeper = subprocess.Popen(
        ["sh", "-c", script, str(container / "cgroup.procs"), sys.executable, str(HOLDER),
         str(4 * MiB)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    processes.append(keeper)
    assert keeper.stdin is not None and keeper.stdout is not None
    try:
        created = json.loads(keeper.stdout.readline())
    finally:
        keeper.stdin.close()  # the creator exits; the segment stays (nattch 0)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{created['pid']}").exists():
        assert time.monotonic() < deadline, "the creator did not exit"
        time.sleep(0.01)

    sysv = _object(lambda o: o.name == f"shmid {created['shmid']}" and "ipc namespace" in o.note)

    assert sysv.orphan
    assert sysv.holders == {}
    assert sysv.pod == uid
    assert "pod: its IPC namespace" in sysv.note
    # the keeper's kill ends the namespace, and the segment with it
