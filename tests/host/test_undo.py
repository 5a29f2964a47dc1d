"""Undo (issue 13.2) on real tmpfs mounts and processes: what a policy changed is put back
when it stops applying, from the record of originals kept in the state dir.

- the standalone agent, its policy file edited to drop the items: size and adj restored;
- a restart between the change and the undo (a new agent, the same state dir);
- a restore the kernel refuses (the original size is now below use): RestoreRefused,
  kept, and retried at resync until it succeeds;
- a target another item now holds is handed over, not restored;
- `nodemem apply` then `nodemem restore` (dry run first), with its exit codes;
- a pid reused in between, and a tmpfs mounted anew at the same path: never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from memcg_helpers import joining
from test_oom_pid_reuse import Reuse, matched  # noqa: F401 - the fixture, used by name
from test_pod_shm import Node, node  # noqa: F401 - the fixture, used by name
from test_pod_shm import policy as pod_shm_policy

from nodemem.agent.loop import AgentSettings, NodeAgent
from nodemem.agent.policy_file import PolicyFile
from nodemem.cli import main
from nodemem.host.oom_adj import read_oom_score_adj
from nodemem.host.originals import AGENT_FILE, APPLY_FILE, Originals
from nodemem.host.paths import HostPaths
from nodemem.policy.pods import PodDirectory, PodInfo, load_pods_file
from samples import exec_done

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def adj(pid: int) -> int:
    return read_oom_score_adj(HostPaths(), pid)  # one read(2): see its docstring


def size(point: Path) -> int:
    stat = os.statvfs(point)
    return stat.f_blocks * stat.f_frsize


def policy(
    tmpfs: list[dict[str, Any]] | None = None,
    oom: list[dict[str, Any]] | None = None,
    name: str = "undo-test",
) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": name},
        "spec": {"tmpfs": tmpfs or [], "oom": oom or []},
    }


def write_policy(path: Path, *documents: dict[str, Any]) -> None:
    """Replace the file (a new inode: the agent sees the edit whatever the mtime)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(yaml.safe_dump_all(documents))
    os.replace(tmp, path)


@pytest.fixture
def sleeper(processes: list[subprocess.Popen[bytes]]) -> Callable[[], tuple[int, str]]:
    """A `sleep` whose cmdline carries a token: (pid, token)."""

    def start() -> tuple[int, str]:
        token = f"{secrets.randbelow(10**6) + 10**6}.3"
        processes.append(subprocess.Popen(["sleep", token]))
        exec_done(processes[-1].pid, ["sleep", token])
        return processes[-1].pid, token

    return start


class Agents:
    """Standalone agents, each in a thread: `agents(policy_file, state_dir)` starts one
    (after its first resync), `halt` stops one and waits for its thread."""

    def __init__(self) -> None:
        self.running: dict[int, tuple[NodeAgent, threading.Thread]] = {}

    def __call__(self, policy_file: Path, state_dir: Path, resync: float = 3600) -> NodeAgent:
        agent = NodeAgent(
            HostPaths(),
            PolicyFile(policy_file),
            settings=AgentSettings(
                resync_seconds=resync, poll_seconds=0.05, use_proc_connector=False
            ),
            originals=Originals(state_dir / AGENT_FILE),
        )
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        self.running[id(agent)] = (agent, thread)
        wait_for(lambda: agent.state.resyncs >= 1)
        return agent

    def halt(self, agent: NodeAgent) -> None:
        _, thread = self.running.pop(id(agent))
        agent.stop()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the agent did not stop"


Start = Agents


@pytest.fixture
def agents() -> Iterator[Agents]:
    started = Agents()
    yield started
    for agent, _ in list(started.running.values()):
        started.halt(agent)


def states(agent: NodeAgent) -> list[str]:
    applied = agent.state.last_apply
    return [] if applied is None else [o.result.state.value for o in applied.tmpfs]


def test_dropping_the_items_from_the_policy_file_restores_size_and_adj(
    mount_tmpfs: Callable[..., Path],
    sleeper: Callable[[], tuple[int, str]],
    agents: Start,
    tmp_path: Path,
) -> None:
    point = mount_tmpfs(options="size=64m,nr_inodes=5000")
    pid, token = sleeper()
    state_dir = tmp_path / "state"
    policy_file = tmp_path / "policy.yaml"
    items = policy(
        tmpfs=[{"path": str(point), "size": "16Mi", "nrInodes": 1000}],
        oom=[{"name": "batch", "match": {"cmdline": token}, "oomScoreAdj": 700}],
    )
    write_policy(policy_file, items)
    agent = agents(policy_file, state_dir)
    assert size(point) == 16 * MiB
    assert os.statvfs(point).f_files == 1000
    assert adj(pid) == 700

    write_policy(policy_file, policy())  # the policy stays, its items are gone
    wait_for(lambda: size(point) == 64 * MiB and adj(pid) == 0)
    assert os.statvfs(point).f_files == 5000
    wait_for(lambda: "Restored" in states(agent))
    applied = agent.state.last_apply
    assert applied is not None
    assert applied.oom.states["Restored"] == 1
    assert applied.oom.matched == 0  # a restore is not a match
    restored = next(o for o in applied.tmpfs if o.result.state.value == "Restored")
    assert restored.result.path == str(point)
    assert "64 MiB" in restored.result.message

    # Nothing is left to put back, on disk either; a further resync restores nothing.
    assert not Originals(state_dir / AGENT_FILE)
    agent.resync()
    assert "Restored" not in states(agent)


def test_a_restart_between_change_and_undo_still_restores(
    mount_tmpfs: Callable[..., Path],
    sleeper: Callable[[], tuple[int, str]],
    agents: Start,
    tmp_path: Path,
) -> None:
    point = mount_tmpfs(options="size=64m")
    pid, token = sleeper()
    state_dir = tmp_path / "state"
    policy_file = tmp_path / "policy.yaml"
    write_policy(
        policy_file,
        policy(
            tmpfs=[{"path": str(point), "size": "8Mi"}],
            oom=[{"name": "batch", "match": {"cmdline": token}, "oomScoreAdj": 300}],
        ),
    )
    first = agents(policy_file, state_dir)
    assert (size(point), adj(pid)) == (8 * MiB, 300)
    agents.halt(first)

    # The policy is deleted while no agent runs; the next one finds the record.
    write_policy(policy_file)
    agents(policy_file, state_dir)
    assert (size(point), adj(pid)) == (64 * MiB, 0)
    assert not Originals(state_dir / AGENT_FILE)


def test_a_refused_restore_is_reported_and_retried_at_resync(
    mount_tmpfs: Callable[..., Path], agents: Start, tmp_path: Path
) -> None:
    point = mount_tmpfs(options="size=16m")
    state_dir = tmp_path / "state"
    policy_file = tmp_path / "policy.yaml"
    write_policy(policy_file, policy(tmpfs=[{"path": str(point), "size": "64Mi"}]))
    agent = agents(policy_file, state_dir, resync=0.2)
    assert size(point) == 64 * MiB
    data = point / "data"
    with open(data, "wb") as file:  # above the original 16 MiB, within the grown limit
        file.write(b"x" * (32 * MiB))

    write_policy(policy_file, policy())
    wait_for(lambda: "RestoreRefused" in states(agent))
    applied = agent.state.last_apply
    assert applied is not None and applied.failed
    refused = next(o for o in applied.tmpfs if o.result.state.value == "RestoreRefused")
    assert "below current use" in refused.result.message
    assert size(point) == 64 * MiB
    assert list(Originals(state_dir / AGENT_FILE).tmpfs)  # kept for the retry

    data.unlink()
    wait_for(lambda: size(point) == 16 * MiB)
    wait_for(lambda: not Originals(state_dir / AGENT_FILE))


def test_a_pod_no_longer_selected_is_restored(
    memcg_root: Path,
    processes: list[subprocess.Popen[bytes]],
    agents: Start,
    tmp_path: Path,
) -> None:
    """The pod is relabelled (the cluster agent's pod watch sets `pods`): the rule's
    labelSelector no longer matches its process, whose adj goes back."""
    pod_uid = str(uuid.uuid4())
    cgroup = memcg_root / "kubepods" / "burstable" / f"pod{pod_uid}" / secrets.token_hex(32)
    cgroup.mkdir(parents=True)
    token = f"{secrets.randbelow(10**6) + 10**6}.5"
    # Before the agent's thread starts: a fork with preexec_fn needs no other threads.
    processes.append(subprocess.Popen(["sleep", token], preexec_fn=joining(cgroup)))  # noqa: PLW1509
    pid = processes[-1].pid
    exec_done(pid, ["sleep", token])
    policy_file = tmp_path / "policy.yaml"
    rule = {"labelSelector": {"matchLabels": {"app": "batch"}}, "cmdline": token}
    write_policy(policy_file, policy(oom=[{"name": "pods", "match": rule, "oomScoreAdj": 400}]))

    def pods(app: str) -> PodDirectory:
        return PodDirectory([PodInfo(pod_uid, "team-a", "batch-1", {"app": app})])

    agent = NodeAgent(
        HostPaths(),
        PolicyFile(policy_file),
        pods=pods("batch"),
        settings=AgentSettings(resync_seconds=0.1, poll_seconds=0.05, use_proc_connector=False),
        originals=Originals(tmp_path / "state" / AGENT_FILE),
    )
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: adj(pid) == 400)
        agent.pods = pods("web")
        wait_for(lambda: adj(pid) == 0)
    finally:
        agent.stop()
        thread.join(timeout=5)


def test_a_pod_shm_no_longer_selected_is_restored(
    node: Node,  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> None:
    """A podShm target (the sandbox tmpfs, reached through a container's namespace) is
    put back like any tmpfs when its pod is relabelled out of the selector."""
    ml = node.pod("ml", "containerd")
    node.container(ml)
    node.container(ml)  # two namespaces, one superblock: restored once
    assert ml.sandbox is not None
    policy_file = tmp_path / "pod-shm.yaml"
    write_policy(policy_file, pod_shm_policy("256Mi"))
    selected = load_pods_file(node.pods_file().read_text())
    ml.labels = {"app": "web"}
    relabelled = load_pods_file(node.pods_file().read_text())
    restored: list[tuple[str, str, str | None]] = []

    def on_cycle(agent: NodeAgent) -> None:  # every cycle's outcomes: Restored lasts one
        outcomes = agent.state.last_apply.tmpfs if agent.state.last_apply else []
        restored.extend(
            (o.result.path, o.pattern, o.pod) for o in outcomes if o.result.state == "Restored"
        )

    agent = NodeAgent(
        HostPaths(),
        PolicyFile(policy_file),
        pods=selected,
        settings=AgentSettings(resync_seconds=0.1, poll_seconds=0.05, use_proc_connector=False),
        on_cycle=on_cycle,
        originals=Originals(tmp_path / "state" / AGENT_FILE),
    )
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: size(ml.sandbox) == 256 * MiB)
        agent.pods = relabelled
        wait_for(lambda: size(ml.sandbox) == 64 * MiB)
        wait_for(lambda: bool(restored))
        assert restored == [("/dev/shm", "podShm", "jobs/ml")]
        wait_for(lambda: not Originals(tmp_path / "state" / AGENT_FILE))
    finally:
        agent.stop()
        thread.join(timeout=5)


def test_a_target_another_item_now_holds_is_handed_over(
    mount_tmpfs: Callable[..., Path], agents: Start, tmp_path: Path
) -> None:
    point = mount_tmpfs(options="size=64m")
    state_dir = tmp_path / "state"
    policy_file = tmp_path / "policy.yaml"
    first = policy(tmpfs=[{"path": str(point), "size": "16Mi"}], name="first")
    write_policy(policy_file, first)
    agent = agents(policy_file, state_dir)
    assert size(point) == 16 * MiB

    # `first` goes, `second` (a glob) holds the mount now: its size, not the original.
    second = policy(tmpfs=[{"path": f"{point.parent}/*", "size": "24Mi"}], name="second")
    write_policy(policy_file, second)
    wait_for(lambda: size(point) == 24 * MiB)
    assert "Restored" not in states(agent)
    # The record keeps the first original: when `second` goes too, 64 MiB comes back.
    write_policy(policy_file, policy(name="second"))
    wait_for(lambda: size(point) == 64 * MiB)


def test_apply_then_restore(
    mount_tmpfs: Callable[..., Path],
    sleeper: Callable[[], tuple[int, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point = mount_tmpfs(options="size=64m")
    pid, token = sleeper()
    manifest = tmp_path / "policy.yaml"
    write_policy(
        manifest,
        policy(
            tmpfs=[{"path": str(point), "size": "16Mi"}],
            oom=[{"name": "batch", "match": {"cmdline": token}, "oomScoreAdj": 600}],
        ),
    )
    state_dir = tmp_path / "undo"
    assert main(["apply", "-f", str(manifest), "--dry-run", "--state-dir", str(state_dir)]) == 0
    assert not (state_dir / APPLY_FILE).exists()  # a dry run records nothing
    assert main(["apply", "-f", str(manifest), "--state-dir", str(state_dir)]) == 0
    assert (size(point), adj(pid)) == (16 * MiB, 600)
    capsys.readouterr()

    assert main(["restore", "--dry-run", "--json", "--state-dir", str(state_dir)]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert [t["state"] for t in planned["tmpfs"]] == ["Planned"]
    assert [r["state"] for r in planned["oom"]["restores"]] == ["Planned"]
    assert (size(point), adj(pid)) == (16 * MiB, 600)

    assert main(["restore", "--state-dir", str(state_dir)]) == 0
    text = capsys.readouterr().out
    assert "Restored" in text and f"pid {pid} sleep" in text
    assert (size(point), adj(pid)) == (64 * MiB, 0)
    assert main(["restore", "--state-dir", str(state_dir)]) == 0
    assert "none to restore" in capsys.readouterr().out


def test_restore_exits_1_when_the_kernel_refuses(
    mount_tmpfs: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    point = mount_tmpfs(options="size=16m")
    manifest = tmp_path / "policy.yaml"
    write_policy(manifest, policy(tmpfs=[{"path": str(point), "size": "64Mi"}]))
    assert main(["apply", "-f", str(manifest)]) == 0  # the default state dir (the test's)
    (point / "data").write_bytes(b"x" * (32 * MiB))
    capsys.readouterr()
    assert main(["restore", "--json"]) == 1
    refused = json.loads(capsys.readouterr().out)["tmpfs"]
    assert [t["state"] for t in refused] == ["RestoreRefused"]
    (point / "data").unlink()
    assert main(["restore"]) == 0
    assert size(point) == 16 * MiB


def test_a_tmpfs_mounted_anew_at_the_path_is_not_restored(
    mount_tmpfs: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    point = mount_tmpfs(options="size=64m")
    manifest = tmp_path / "policy.yaml"
    write_policy(manifest, policy(tmpfs=[{"path": str(point), "size": "16Mi"}]))
    assert main(["apply", "-f", str(manifest)]) == 0
    subprocess.run(["umount", str(point)], check=True)
    mount_tmpfs(options="size=32m", at=point)  # the kernel gives it the freed st_dev

    assert main(["restore"]) == 0
    assert size(point) == 32 * MiB
    assert "Restored" not in capsys.readouterr().out
    assert not Originals(Path(os.environ["NODEMEM_STATE_DIR"]) / APPLY_FILE)


def test_a_reused_pid_is_not_restored(
    matched: Reuse,  # noqa: F811 - the imported fixture
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = tmp_path / "policy.yaml"
    rule = {"name": "p", "match": {"cmdline": matched.token}, "oomScoreAdj": 700}
    write_policy(manifest, policy(oom=[rule]))
    assert main(["apply", "-f", str(manifest)]) == 0
    assert adj(matched.pid) == 700

    matched.reuse()  # P exits; Q, unrelated, gets its pid
    Path(f"/proc/{matched.pid}/oom_score_adj").write_text("300")
    capsys.readouterr()
    assert main(["restore", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["oom"]["restores"] == []
    assert adj(matched.pid) == 300  # Q keeps its own value
    assert not Originals(Path(os.environ["NODEMEM_STATE_DIR"]) / APPLY_FILE)
