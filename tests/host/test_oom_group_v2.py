"""Group kills (memory.oom.group) against real OOM kills on a cgroup-v2 kernel (the guest).

Each test builds cgroups under its own /sys/fs/cgroup/nodemem-test-<hex>, starts a grower
(Python, the largest process: the victim) and `sleep` processes beside it, predicts with
predict_victims, then lets the grower ask for more than the 32 MiB limit in one step and
compares {victim} ∪ killedWith with the processes the kernel actually killed.
docs/kernel-facts.md#oom-group-kills.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from memcg_helpers import UNIFIED, joining

from nodemem.host.oom_predict import Candidate, predict_victims
from nodemem.host.paths import HostPaths
from samples import exec_done

pytestmark = [pytest.mark.privileged, pytest.mark.guest_v2]

PATHS = HostPaths()
MiB = 1 << 20
LIMIT = 32 * MiB
DEADLINE_S = 30.0

# Holds nothing until told a size on stdin, then touches that many bytes (and dies there).
GROWER = """
import sys
held = []
print("ready", flush=True)
for line in sys.stdin:
    chunk = bytearray(int(line))
    for i in range(0, len(chunk), 4096):  # touch every page: charged to the memcg
        chunk[i] = 1
    held.append(chunk)
    print("grown", flush=True)
"""
SLEEP = ["sleep", "600"]


def _cgroup(parent: Path, name: str, *, group: int = 0, limit: int | None = None) -> Path:
    directory = parent / name
    directory.mkdir()
    (directory / "memory.oom.group").write_text(str(group))
    if limit is not None:
        (directory / "memory.max").write_text(str(limit))
        if (directory / "memory.swap.max").exists():
            (directory / "memory.swap.max").write_text("0")
    return directory


def _delegate(directory: Path) -> Path:
    (directory / "cgroup.subtree_control").write_text("+memory")
    return directory


class Workload:
    def __init__(self, processes: list[subprocess.Popen[bytes]]) -> None:
        self.processes = processes
        self.grower: subprocess.Popen[bytes] | None = None

    def grow_in(self, cgroup: Path) -> int:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", GROWER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=joining(cgroup),  # noqa: PLW1509 - no threads in this process
        )
        self.processes.append(process)
        self.grower = process
        assert self._line(time.monotonic() + DEADLINE_S) == b"ready\n"
        return process.pid

    def sleep_in(self, cgroup: Path) -> int:
        process = subprocess.Popen(SLEEP, preexec_fn=joining(cgroup))  # noqa: PLW1509
        self.processes.append(process)
        exec_done(process.pid, SLEEP, timeout=DEADLINE_S)
        return process.pid

    def overgrow(self) -> None:
        """The grower asks for twice the limit at once: an OOM in its memcg."""
        assert self.grower is not None and self.grower.stdin is not None
        self.grower.stdin.write(f"{2 * LIMIT}\n".encode())
        self.grower.stdin.flush()

    def killed(self, expected: set[int]) -> set[int]:
        """Waits until the expected processes exited; returns every one that died by SIGKILL."""
        deadline = time.monotonic() + DEADLINE_S
        by_pid = {p.pid: p for p in self.processes}
        while any(by_pid[pid].poll() is None for pid in expected):
            assert time.monotonic() < deadline, (
                f"alive: {[p for p in expected if by_pid[p].poll() is None]}"
            )
            time.sleep(0.01)  # poll: waitpid has no timeout; the kill has happened
        return {p.pid for p in self.processes if p.poll() == -9}

    def _line(self, deadline: float) -> bytes:
        assert self.grower is not None and self.grower.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "grower did not answer in time"
            if select.select([self.grower.stdout], [], [], remaining)[0]:
                chunk = os.read(self.grower.stdout.fileno(), 64)
                if not chunk:
                    return b""
                line += chunk
        return line


@pytest.fixture
def workload(processes: list[subprocess.Popen[bytes]]) -> Workload:
    return Workload(processes)


def _events(cgroup: Path) -> dict[str, int]:
    pairs = (line.split() for line in (cgroup / "memory.events").read_text().splitlines())
    return {key: int(value) for key, value in pairs}


def _hierarchy_path(cgroup: Path) -> str:
    return "/" + str(cgroup.relative_to(UNIFIED))


def _victim(cgroup: Path | None) -> Candidate:
    prediction = predict_victims(PATHS, cgroup=None if cgroup is None else str(cgroup))
    return prediction.victims[0]


def test_group_on_the_container_below_the_pod_kills_the_container(
    v2_root: Path, workload: Workload
) -> None:
    pod = _delegate(_cgroup(v2_root, "pod", limit=LIMIT))
    app = _cgroup(pod, "app", group=1)
    sidecar = _cgroup(pod, "sidecar", group=0)
    grower = workload.grow_in(app)
    app_sleepers = {workload.sleep_in(app), workload.sleep_in(app)}
    sidecar_sleeper = workload.sleep_in(sidecar)

    victim = _victim(pod)  # an OOM of the pod cgroup

    assert victim.pid == grower
    assert victim.group is not None
    assert victim.group.cgroup == _hierarchy_path(app)
    assert Path(f"/proc/{grower}/cgroup").read_text() == f"0::{victim.group.cgroup}\n"
    assert set(victim.group.killed_with) == app_sleepers
    workload.overgrow()
    killed = workload.killed({victim.pid, *victim.group.killed_with})
    assert killed == {victim.pid, *victim.group.killed_with}
    assert sidecar_sleeper not in killed
    assert _events(app)["oom_group_kill"] == 1
    assert _events(sidecar)["oom_group_kill"] == 0
    # The victim is killed, then visited again as a member of its group: counted twice.
    assert _events(app)["oom_kill"] == len(killed) + 1


def test_group_above_the_oom_domain_kills_the_victim_alone(
    v2_root: Path, workload: Workload
) -> None:
    pod = _delegate(_cgroup(v2_root, "pod", group=1))
    ctr = _cgroup(pod, "ctr", group=0, limit=LIMIT)
    other = _cgroup(pod, "other", group=0)
    grower = workload.grow_in(ctr)
    ctr_sleepers = {workload.sleep_in(ctr), workload.sleep_in(ctr)}
    other_sleeper = workload.sleep_in(other)

    victim = _victim(ctr)  # an OOM of the container: the pod's oom.group is above it
    node = next(c for c in predict_victims(PATHS, limit=1000).victims if c.pid == grower)

    assert victim.pid == grower
    assert victim.group is None
    # The same process in a node-wide OOM: the pod's group would take everything in it.
    assert node.group is not None
    assert node.group.cgroup == _hierarchy_path(pod)
    assert set(node.group.killed_with) == {*ctr_sleepers, other_sleeper}
    workload.overgrow()
    assert workload.killed({grower}) == {grower}
    assert _events(ctr)["oom_kill"] == 1
    assert _events(pod)["oom_group_kill"] == 0


def test_a_task_at_minus_1000_inside_a_group_is_spared(v2_root: Path, workload: Workload) -> None:
    ctr = _cgroup(v2_root, "ctr", group=1, limit=LIMIT)
    grower = workload.grow_in(ctr)
    killable = workload.sleep_in(ctr)
    spared = workload.sleep_in(ctr)
    Path(f"/proc/{spared}/oom_score_adj").write_text("-1000")  # the guest has CAP_SYS_RESOURCE

    victim = _victim(ctr)

    assert victim.pid == grower
    assert victim.group is not None
    assert victim.group.cgroup == _hierarchy_path(ctr)
    assert victim.group.killed_with == (killable,)
    workload.overgrow()
    assert workload.killed({grower, killable}) == {grower, killable}
    assert spared in {p.pid for p in workload.processes if p.poll() is None}
    assert _events(ctr)["oom_group_kill"] == 1
