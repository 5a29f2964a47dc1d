"""podShm items on a node laid out as containerd and CRI-O lay it out.

Each pod sandbox has one 64 MiB tmpfs in the runtime's directory (here under the test's
tmp_path), bind-mounted at /dev/shm in each container's own mount namespace (`unshare
--mount --propagation private`: the host's /dev/shm is never touched), and the container
processes sit in kubepods memory cgroups named with the pod UID (under this test's own v1
memory cgroup). `nodemem apply` and the agent find the sandbox tmpfs from the processes.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemem.agent.loop import AgentSettings, NodeAgent
from nodemem.agent.policy_file import PolicyFile
from nodemem.cli import main
from nodemem.host import pod_shm as pod_shm_module
from nodemem.host.paths import HostPaths
from nodemem.host.remount import reconfigure_tmpfs
from nodemem.policy import apply as apply_module
from nodemem.policy.pods import load_pods_file

pytestmark = pytest.mark.privileged

MiB = 1 << 20


@dataclass(frozen=True)
class Layout:
    cgroup: str  # the container's cgroup, below the test's memory cgroup
    sandbox: str  # where the runtime keeps the sandbox's /dev/shm tmpfs, below tmp_path
    monitor: str | None = None  # CRI-O's conmon: in the pod's cgroup, in no container


LAYOUTS = {
    # containerd, cgroupfs driver
    "containerd": Layout(
        cgroup="kubepods/burstable/pod{uid}/{cid}",
        sandbox="run/containerd/io.containerd.grpc.v1.cri/sandboxes/{sid}/shm",
    ),
    # CRI-O, systemd driver
    "cri-o": Layout(
        cgroup="kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/"
        "crio-{cid}.scope",
        sandbox="run/containers/storage/overlay-containers/{sid}/userdata/shm",
        monitor="kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/"
        "crio-conmon-{cid}.scope",
    ),
}


@dataclass
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    layout: Layout
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    sandbox: Path | None = None  # its /dev/shm tmpfs, as the host sees it
    containers: list[str] = field(default_factory=list)  # container ids

    def cgroup(self, layout: str, cid: str) -> str:
        return layout.format(uid=self.uid, uid_=self.uid.replace("-", "_"), cid=cid)

    def as_object(self) -> dict[str, Any]:
        return {
            "kind": "Pod",
            "metadata": {
                "uid": self.uid,
                "name": self.name,
                "namespace": self.namespace,
                "labels": self.labels,
            },
            "status": {
                "containerStatuses": [
                    {"name": f"c{index}", "containerID": f"containerd://{cid}"}
                    for index, cid in enumerate(self.containers)
                ]
            },
        }


def size_of(point: Path) -> int:
    stat = os.statvfs(point)
    return stat.f_blocks * stat.f_frsize


class Node:
    """Pods, their sandbox tmpfs and container processes; all removed after the test."""

    def __init__(
        self,
        tmp_path: Path,
        memcg_root: Path,
        mount_tmpfs: Callable[..., Path],
        processes: list[subprocess.Popen[bytes]],
    ) -> None:
        self.tmp_path = tmp_path
        self.memcg_root = memcg_root
        self.mount_tmpfs = mount_tmpfs
        self.processes = processes
        self.pods: list[Pod] = []

    def pod(self, name: str, layout: str, *, labels: dict[str, str] | None = None) -> Pod:
        pod = Pod(name, "jobs", labels or {"app": name}, LAYOUTS[layout])
        sandbox = self.tmp_path / pod.layout.sandbox.format(sid=secrets.token_hex(32))
        pod.sandbox = self.mount_tmpfs(at=sandbox, options="size=64m,nosuid,nodev,mode=1777")
        self.pods.append(pod)
        return pod

    def container(self, pod: Pod, shm: Path | str | None = "sandbox") -> int:
        """A container process of `pod`, with `shm` (default the sandbox's tmpfs; None:
        the host's /dev/shm, as hostIPC) bind-mounted at /dev/shm in its namespace."""
        cid = secrets.token_hex(32)
        pod.containers.append(cid)
        bound = pod.sandbox if shm == "sandbox" else shm
        mount = f'mount --bind "{bound}" /dev/shm && ' if bound is not None else ""
        inside = f"{mount}echo ready && exec sleep 1000"
        process = self._in_cgroup(
            pod.cgroup(pod.layout.cgroup, cid),
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", inside],
        )
        _wait_ready(process)
        if pod.layout.monitor is not None:  # conmon: host mount namespace, pod's cgroup
            self._in_cgroup(pod.cgroup(pod.layout.monitor, cid), ["sleep", "1000"])
        return process.pid

    def _in_cgroup(self, relative: str, command: list[str]) -> subprocess.Popen[bytes]:
        # The shell joins the cgroup before it execs the command: no preexec_fn, which is
        # unsafe while the agent's thread runs.
        cgroup = self.memcg_root / relative
        cgroup.mkdir(parents=True)
        join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        process = subprocess.Popen(
            ["sh", "-c", join, str(cgroup), *command], stdout=subprocess.PIPE
        )
        self.processes.append(process)
        return process

    def pods_file(self) -> Path:
        path = self.tmp_path / "pods.json"
        path.write_text(json.dumps({"kind": "List", "items": [p.as_object() for p in self.pods]}))
        return path


def _wait_ready(process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 10)
    assert ready, "no 'ready' from the container"
    line = process.stdout.readline()
    assert line.strip() == b"ready", f"container exited with {process.poll()}"


@pytest.fixture
def node(memcg_root, mount_tmpfs, processes, tmp_path) -> Node:
    # Fixture order: processes are killed first, then the tmpfs unmounted, then the cgroups
    # removed (they refuse while a task is in them).
    return Node(tmp_path, memcg_root, mount_tmpfs, processes)


def policy(size: str = "256Mi", **item: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "pod-shm"},
        "spec": {
            "tmpfs": [
                {
                    "podShm": True,
                    "pods": {"namespace": "jobs", "labelSelector": {"matchLabels": {"app": "ml"}}},
                    "size": size,
                    **item,
                }
            ]
        },
    }


def run_apply(node: Node, document: dict[str, Any], *args: str) -> int:
    path = node.tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    return main(["apply", "-f", str(path), "--pods-file", str(node.pods_file()), *args])


def rows(report: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    return [(t["path"], t["pod"], t["state"]) for t in report["tmpfs"]]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_apply_sizes_the_sandbox_tmpfs_of_selected_pods_once(
    node: Node, layout: str, capsys
) -> None:
    ml = node.pod("ml", layout)
    node.container(ml)
    node.container(ml)  # a second container: the same sandbox tmpfs
    web = node.pod("web", layout)
    node.container(web)
    assert ml.sandbox is not None and web.sandbox is not None

    assert run_apply(node, policy("256Mi"), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert rows(report) == [("/dev/shm", "jobs/ml", "Applied")]
    assert report["tmpfs"][0]["pattern"] == "podShm"
    assert size_of(ml.sandbox) == 256 * MiB
    assert size_of(web.sandbox) == 64 * MiB  # not selected: untouched
    # The flags of the mount are kept (seen from the host's mount of the sandbox).
    options = next(
        line.split()[5]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == str(ml.sandbox)
    )
    assert {"nosuid", "nodev"} <= set(options.split(","))

    assert run_apply(node, policy("256Mi"), "--json") == 0
    assert rows(json.loads(capsys.readouterr().out)) == [("/dev/shm", "jobs/ml", "Unchanged")]

    # Shrinking an empty one is allowed; the text output names the pod.
    assert run_apply(node, policy("16Mi")) == 0
    out = capsys.readouterr().out
    assert "/dev/shm (jobs/ml)" in out and "Applied" in out
    assert size_of(ml.sandbox) == 16 * MiB
    assert size_of(web.sandbox) == 64 * MiB


def test_never_below_use_and_headroom(node: Node, capsys) -> None:
    ml = node.pod("ml", "containerd")
    node.container(ml)
    assert ml.sandbox is not None
    (ml.sandbox / "segment").write_bytes(b"x" * (20 * MiB))

    assert run_apply(node, policy("16Mi"), "--json") == 1
    [row] = json.loads(capsys.readouterr().out)["tmpfs"]
    assert (row["pod"], row["state"]) == ("jobs/ml", "Refused")
    assert "below current use" in row["message"]
    assert size_of(ml.sandbox) == 64 * MiB

    assert run_apply(node, policy("16Mi", headroom="4Mi"), "--json") == 0
    assert rows(json.loads(capsys.readouterr().out)) == [("/dev/shm", "jobs/ml", "Applied")]
    assert size_of(ml.sandbox) == 24 * MiB


def test_a_memory_emptydir_at_dev_shm_is_sized_through_its_volume_only(node: Node, capsys) -> None:
    ml = node.pod("ml", "containerd")
    volumes = node.tmp_path / "kubelet/pods" / ml.uid / "volumes/kubernetes.io~empty-dir"
    dshm = node.mount_tmpfs(at=volumes / "dshm", options="size=64m")
    node.container(ml, shm=dshm)
    document = policy("256Mi")
    document["spec"]["tmpfs"].append(
        {
            "path": f"{node.tmp_path}/kubelet/pods/*/volumes/kubernetes.io~empty-dir/*",
            "size": "32Mi",
            "pods": {"namespace": "jobs", "volume": "dshm"},
        }
    )

    assert run_apply(node, document, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert rows(report) == [("/dev/shm", "jobs/ml", "NotFound"), (str(dshm), None, "Applied")]
    assert "memory emptyDir 'dshm'" in report["tmpfs"][0]["message"]
    assert size_of(dshm) == 32 * MiB  # by the volume item, not 256 MiB by podShm
    assert ml.sandbox is not None and size_of(ml.sandbox) == 64 * MiB


def test_a_pod_that_sees_the_nodes_dev_shm_is_not_touched(node: Node, capsys) -> None:
    ml = node.pod("ml", "cri-o")
    node.container(ml, shm=None)  # hostIPC: the host's /dev/shm
    before = size_of(Path("/dev/shm"))

    assert run_apply(node, policy("256Mi"), "--json") == 0
    [row] = json.loads(capsys.readouterr().out)["tmpfs"]
    assert (row["pod"], row["state"]) == ("jobs/ml", "NotFound")
    assert "node's own /dev/shm" in row["message"]
    assert size_of(Path("/dev/shm")) == before


def test_no_running_pod_is_not_found(node: Node, capsys) -> None:
    node.pod("ml", "containerd")  # known, but no process on this node
    assert run_apply(node, policy("256Mi"), "--json") == 0
    [row] = json.loads(capsys.readouterr().out)["tmpfs"]
    assert (row["pod"], row["state"]) == (None, "NotFound")


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def agent_running(node: Node) -> Iterator[Callable[[dict[str, Any]], NodeAgent]]:
    threads: list[tuple[NodeAgent, threading.Thread]] = []

    def start(document: dict[str, Any]) -> NodeAgent:
        path = node.tmp_path / "policy.yaml"
        path.write_text(yaml.safe_dump(document))
        agent = NodeAgent(
            HostPaths(),
            PolicyFile(path),
            pods=load_pods_file(node.pods_file().read_text()),
            settings=AgentSettings(resync_seconds=3600, poll_seconds=0.05),
        )
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        threads.append((agent, thread))
        wait_for(lambda: agent.state.resyncs >= 1)
        return agent

    yield start
    for agent, thread in threads:
        agent.stop()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the agent did not stop"


def test_agent_sizes_a_pod_started_later_at_its_first_process(
    node: Node, agent_running: Callable[[dict[str, Any]], NodeAgent], processes
) -> None:
    ml = node.pod("ml", "cri-o")  # in the pods the agent knows; no process yet
    web = node.pod("web", "cri-o")
    assert ml.sandbox is not None and web.sandbox is not None
    token = str(secrets.randbelow(10**6) + 10**6)
    document = policy("256Mi")
    # An oom rule on marker processes: their adj tells that earlier exec events are done.
    document["spec"]["oom"] = [{"name": "mark", "match": {"cmdline": token}, "oomScoreAdj": 700}]
    agent = agent_running(document)
    assert agent.state.connector_active
    assert agent.state.last_apply is not None
    assert [(o.pod, o.result.state) for o in agent.state.last_apply.tmpfs] == [(None, "NotFound")]

    node.container(ml)  # its first process execs: the exec event sizes the sandbox
    node.container(web)
    wait_for(lambda: size_of(ml.sandbox) == 256 * MiB)
    assert agent.state.resyncs == 1  # not a resync: the resync is an hour away
    wait_for(
        lambda: (
            [(o.pod, o.result.state) for o in agent.state.last_apply.tmpfs]
            == [("jobs/ml", "Applied")]
        )
    )

    def events_done() -> None:
        processes.append(subprocess.Popen(["sleep", f"{token}.{len(processes)}"]))
        pid = processes[-1].pid
        wait_for(lambda: Path(f"/proc/{pid}/oom_score_adj").read_text().strip() == "700")

    # A second container of the pod shows the same sandbox tmpfs: handled, not sized again
    # (put back to 64 MiB here, it stays so until the next resync).
    events_done()
    reconfigure_tmpfs(str(ml.sandbox), {"size": str(64 * MiB)})
    node.container(ml)
    events_done()
    assert size_of(ml.sandbox) == 64 * MiB
    assert size_of(web.sandbox) == 64 * MiB  # never selected


def test_a_pod_reached_through_a_process_that_exits_meanwhile_is_looked_at_again(
    node: Node, monkeypatch
) -> None:
    """The exec path reaches a pod's /dev/shm through the process that exec'ed, often a
    runtime's short-lived helper. When it exits between the look and the remount, the
    apply finds the path gone: the namespace is not marked as handled, and the next
    process's exec sizes it. (The race, made certain: the helper is ended in the remount.)
    """
    ml = node.pod("ml", "cri-o")
    assert ml.sandbox is not None
    path = node.tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy("256Mi")))
    agent = NodeAgent(
        HostPaths(),
        PolicyFile(path),
        pods=load_pods_file(node.pods_file().read_text()),
        settings=AgentSettings(use_proc_connector=False),
    )
    assert agent._refresh_policy()
    agent.resync()  # no process yet: NotFound
    assert agent.state.effective is not None
    items = [item for item in agent.state.effective.tmpfs if item.item.pod_shm]

    staying = node.container(ml)
    helper = node._in_cgroup(
        ml.cgroup(ml.layout.cgroup, secrets.token_hex(32)),
        ["nsenter", "--mount", "--target", str(staying), "sleep", "1000"],
    )
    namespace = os.stat(f"/proc/{staying}/ns/mnt").st_ino
    wait_for(lambda: os.stat(f"/proc/{helper.pid}/ns/mnt").st_ino == namespace)

    real_apply_limit = apply_module.apply_limit

    def helper_exits_first(*args: Any, **kwargs: Any) -> Any:
        helper.kill()
        helper.wait()
        return real_apply_limit(*args, **kwargs)

    monkeypatch.setattr(apply_module, "apply_limit", helper_exits_first)
    agent._size_pod_shm(helper.pid, items)
    assert agent.state.last_apply is not None
    [row] = agent.state.last_apply.tmpfs
    assert (row.pod, row.result.state) == ("jobs/ml", "NotFound")
    assert "is gone" in row.result.message
    assert size_of(ml.sandbox) == 64 * MiB

    monkeypatch.setattr(apply_module, "apply_limit", real_apply_limit)
    agent._size_pod_shm(staying, items)
    assert size_of(ml.sandbox) == 256 * MiB
    [row] = agent.state.last_apply.tmpfs
    assert (row.pod, row.result.state) == ("jobs/ml", "Applied")


def test_pods_are_sized_when_the_hosts_mount_namespace_cannot_be_read(
    node: Node, capsys, monkeypatch
) -> None:
    """Some hosts refuse even root /proc/1/ns (a VM sandbox's init: seen on the real
    node tier's machine). Pods' /dev/shm are still found and sized; one that shows the
    node's own /dev/shm is still told by its superblock and left alone."""
    ml = node.pod("ml", "containerd")
    node.container(ml)
    host_ipc = node.pod("ml-host-ipc", "containerd", labels={"app": "ml"})
    node.container(host_ipc, shm=None)
    real_mount_namespace = pod_shm_module.mount_namespace

    def host_refuses(paths: HostPaths, pid: int | None) -> int:
        if pid is None:  # the host root's namespace (HostPaths(): ours)
            raise PermissionError(13, "Permission denied", "/proc/1/ns/mnt")
        return real_mount_namespace(paths, pid)

    monkeypatch.setattr(pod_shm_module, "mount_namespace", host_refuses)
    before = size_of(Path("/dev/shm"))
    assert run_apply(node, policy("256Mi"), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted((t["pod"], t["state"]) for t in report["tmpfs"]) == [
        ("jobs/ml", "Applied"),
        ("jobs/ml-host-ipc", "NotFound"),
    ]
    assert ml.sandbox is not None and size_of(ml.sandbox) == 256 * MiB
    assert size_of(Path("/dev/shm")) == before
