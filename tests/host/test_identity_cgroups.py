"""read_identity on processes placed in real memory cgroups laid out like kubelet's
(cgroupfs and systemd drivers), under this test's own v1 memory cgroup."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from memcg_helpers import MEMORY_V1, joining

from nodemem.host.identity import read_identity
from nodemem.host.paths import HostPaths
from samples import exec_done

pytestmark = pytest.mark.privileged


@pytest.fixture
def spawn_in() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.kill()
    for process in processes:
        process.wait(timeout=10)


def _sleep_in(cgroup: Path, processes: list[subprocess.Popen[bytes]]) -> int:
    # preexec_fn is unsafe with threads; this test process starts none.
    process = subprocess.Popen(["sleep", "60"], preexec_fn=joining(cgroup))  # noqa: PLW1509
    processes.append(process)
    exec_done(process.pid, ["sleep", "60"])  # identity is read right after
    return process.pid


LAYOUTS = {
    "cgroupfs": "kubepods/burstable/pod{uid}/{cid}",
    "systemd": (
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/"
        "cri-containerd-{cid}.scope"
    ),
}


@pytest.mark.parametrize("driver", sorted(LAYOUTS))
def test_identity_from_a_kubelet_like_cgroup(
    driver: str, memcg_root: Path, spawn_in: list[subprocess.Popen[bytes]]
) -> None:
    pod_uid = str(uuid.uuid4())
    container_id = secrets.token_hex(32)
    relative = LAYOUTS[driver].format(uid=pod_uid, uid_=pod_uid.replace("-", "_"), cid=container_id)
    cgroup = memcg_root / relative
    cgroup.mkdir(parents=True)
    pid = _sleep_in(cgroup, spawn_in)

    identity = read_identity(HostPaths(), pid)

    assert identity.cgroup == f"/{memcg_root.relative_to(MEMORY_V1)}/{relative}"
    assert identity.pod_uid == pod_uid
    assert identity.container_id == container_id
    assert identity.qos_class == "Burstable"
    assert identity.comm == "sleep"
    assert identity.cmdline == "sleep 60"
    sleep_binary = shutil.which("sleep")
    assert sleep_binary is not None
    assert identity.exe == os.path.realpath(sleep_binary)
    assert identity.uid == os.getuid()
    assert identity.kthread is False
    assert any(line.path == identity.cgroup for line in identity.cgroup_lines)
