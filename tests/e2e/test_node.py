"""The chart on a real node, as users run it: `helm install`, pods Running and Ready,
`kubectl apply` of policies, real pods' /dev/shm and processes changed by the agent in
its pod, the report and the policy status as `kubectl get` shows them.

Only pods this tier starts are selected: the policies name their namespaces and labels,
so nothing else on this machine is touched (the examples' host-wide items are not
applied here).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from controlplane import ControlPlane
from node import Node, lacks_sys_resource
from restclient import ApiError, Kube, wait_until

from nodemem.host.oom_adj import read_oom_score_adj
from nodemem.host.paths import HostPaths
from nodemem.host.proc_connector import EventType, ProcConnector, ProcEvent
from nodemem.host.remount import reconfigure_tmpfs

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "nodemem"
EXAMPLES = ROOT / "examples"
RELEASE = "nodemem"
NAMESPACE = "nodemem-system"
AGENT = f"{RELEASE}-agent"
POLICIES = "nodemem.dev/v1alpha1/nodememorypolicies"
REPORTS = "nodemem.dev/v1alpha1/nodememoryreports"
IMAGE = "docker.io/library/nodemem:0.1.0"  # Debian with coreutils: `sleep` for test pods
POD_TIMEOUT = 180.0

pytestmark = pytest.mark.privileged


def chart_values(node: Node) -> dict[str, Any]:
    """The chart's defaults, securityContext unchanged, but where this machine differs:
    the agent's state on the host below the node's directory (not /var/lib/nodemem), and
    SYS_RESOURCE not asked for where the machine cannot grant it (the pod would never
    start: runc "unable to apply caps")."""
    agent: dict[str, Any] = {"stateDir": str(node.root / "agent-state")}
    if lacks_sys_resource():
        agent["omitCapabilities"] = ["SYS_RESOURCE"]
    return {"agent": agent}


def pods(kube: Kube, namespace: str, selector: str) -> list[dict[str, Any]]:
    return kube.list_objects("v1/pods", namespace=namespace, labelSelector=selector)


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def describe_pods(kube: Kube, namespace: str) -> str:
    return json.dumps(
        [
            (p["metadata"]["name"], p.get("status", {}).get("containerStatuses"))
            for p in kube.list_objects("v1/pods", namespace=namespace)
        ],
        indent=1,
    )


def wait_ready(kube: Kube, namespace: str, selector: str, count: int = 1) -> list[dict[str, Any]]:
    wait_until(
        lambda: len([p for p in pods(kube, namespace, selector) if ready(p)]) == count,
        timeout=POD_TIMEOUT,
        interval=0.5,
        message=lambda: f"{count} pod(s) {selector} Ready: {describe_pods(kube, namespace)}",
    )
    return pods(kube, namespace, selector)


@dataclass
class Release:
    """The chart installed by Helm's engine; `upgrade` changes its values."""

    node: Node
    config: helm.Config
    info: dict[str, Any]

    def upgrade(self, nri: dict[str, Any] | None = None, **agent: Any) -> None:
        values = chart_values(self.node)
        values["agent"].update(agent)
        if nri is not None:
            values["nri"] = nri
        self.info = self.config.upgrade(
            str(CHART), RELEASE, values, namespace=NAMESPACE, wait="hookOnly", timeout=120
        )


@pytest.fixture(scope="module")
def release(
    node: Node, plane: Any, kube: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    kubeconfig = tmp_path_factory.mktemp("helm") / "admin.kubeconfig"
    kubeconfig.write_text(plane.kubeconfig_for("admin"))
    config = helm.Config(kubeconfig_path=kubeconfig, namespace=NAMESPACE)
    try:
        installed = config.install(
            str(CHART),
            RELEASE,
            chart_values(node),
            namespace=NAMESPACE,
            create_namespace=True,
            wait="hookOnly",
            timeout=120,
        )
        yield Release(node, config, installed)
    finally:
        try:
            config.uninstall(RELEASE, ignore_not_found=True, wait="hookOnly", timeout=120)
        finally:
            config.close()


def run_pod(
    kube: Kube,
    namespace: str,
    name: str,
    labels: dict[str, str],
    resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A pod of the project image that sleeps; Ready when its process runs."""
    if kube.get_object("v1/namespaces", namespace) is None:
        kube.create_object("v1/namespaces", {"metadata": {"name": namespace}})
    kube.create_object(
        "v1/pods",
        {
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "main",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sleep", "infinity"],
                        "resources": resources or {},
                    }
                ],
            },
        },
        namespace=namespace,
    )
    (pod,) = wait_ready(kube, namespace, ",".join(f"{k}={v}" for k, v in labels.items()))
    return pod


def container_pid(node: Node, pod: dict[str, Any]) -> int:
    """The host pid of the pod's container's first process (containerd's task list)."""
    (status,) = pod["status"]["containerStatuses"]
    container_id = status["containerID"].removeprefix("containerd://")
    for line in node.ctr("tasks", "list").splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == container_id:
            return int(pid)
    raise AssertionError(f"no task for container {container_id}")


def sandbox_pid(pod: dict[str, Any]) -> int:
    """The host pid of the pod's sandbox process (the pause image's)."""
    marker = f"pod{pod['metadata']['uid']}/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "pause" and marker in (
                entry / "cgroup"
            ).read_text():
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError(f"no sandbox process of pod {pod['metadata']['name']}")


def report(kube: Kube, node: Node) -> dict[str, Any] | None:
    found: dict[str, Any] | None = kube.get_object(REPORTS, node.name)
    return found


def test_helm_install_runs_the_agent_and_the_controller_ready(
    release: Release, kube: Kube, node: Node, kubectl: Callable[..., str]
) -> None:
    assert release.info["status"] == "deployed"
    (agent,) = wait_ready(kube, NAMESPACE, "app.kubernetes.io/component=agent")
    (controller,) = wait_ready(kube, NAMESPACE, "app.kubernetes.io/component=controller")
    assert agent["spec"]["nodeName"] == node.name
    assert controller["spec"]["nodeName"] == node.name
    # The agent's container is what the chart asks for: not privileged, root, caps listed.
    security = agent["spec"]["containers"][0]["securityContext"]
    assert security["privileged"] is False
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    pid = container_pid(node, agent)
    status = Path(f"/proc/{pid}/status").read_text()
    effective = int(
        next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16
    )
    wanted = {
        21: "SYS_ADMIN",
        19: "SYS_PTRACE",
        2: "DAC_READ_SEARCH",
        1: "DAC_OVERRIDE",
        3: "FOWNER",
    }
    if not lacks_sys_resource():
        wanted[24] = "SYS_RESOURCE"
    assert effective == sum(1 << bit for bit in wanted), f"CapEff {effective:#x}"
    seccomp = next(line for line in status.splitlines() if line.startswith("Seccomp:"))
    assert seccomp.split()[1] == "2"  # filter mode: the runtime's default profile
    # The agent writes its node's report once it has seen its policies, Node and pods.
    wait_until(
        lambda: report(kube, node) is not None,
        timeout=120,
        interval=0.5,
        message="the agent's NodeMemoryReport",
    )
    out = kubectl("get", "nmr")
    assert node.name in out


def test_a_pods_dev_shm_is_sized_by_the_example_policy(
    release: Release, kube: Kube, node: Node, kubectl: Callable[..., str]
) -> None:
    wait_ready(kube, NAMESPACE, "app.kubernetes.io/component=agent")
    try:
        # The pod first: a new policy is applied at once, a new pod at the next resync
        # (the chart's default pod network has no exec events).
        pod = run_pod(kube, "ml", "trainer", {"shm": "large"})
        kubectl("apply", "-f", str(EXAMPLES / "pod-dev-shm.yaml"))
        pid = container_pid(node, pod)
        shm = f"/proc/{pid}/root/dev/shm"

        def size() -> int:
            stat = os.statvfs(shm)
            return stat.f_blocks * stat.f_frsize

        wait_until(
            lambda: size() == 2 << 30,
            timeout=60,
            interval=0.2,
            message=lambda: f"the pod's /dev/shm at 2Gi (now {size()})",
        )

        def row() -> dict[str, Any] | None:
            found = report(kube, node)
            rows = (found or {}).get("status", {}).get("tmpfs", [])
            return next((r for r in rows if r.get("pod") == "ml/trainer"), None)

        wait_until(
            lambda: (row() or {}).get("state") in ("Applied", "Unchanged"),
            timeout=120,
            interval=0.5,
            message=lambda: f"the report's row for ml/trainer: {row()}",
        )

        # The controller, in its pod, rolls the report up into the policy's status.
        def nodes() -> dict[str, int]:
            policy = kube.get_object(POLICIES, "ml-pod-shm") or {}
            counts: dict[str, int] = policy.get("status", {}).get("nodes", {})
            return counts

        wait_until(
            lambda: nodes().get("matched") == 1 and nodes().get("applied") == 1,
            timeout=120,
            interval=0.5,
            message=lambda: f"the policy's status: nodes {nodes()}",
        )
        shown = kubectl("get", "nmp,nmr")
        print(f"\n$ kubectl get nmp,nmr\n{shown}")
        assert "ml-pod-shm" in shown and node.name in shown
        described = kubectl("describe", "nmp", "ml-pod-shm")
        print(f"$ kubectl describe nmp ml-pod-shm\n{described}")
    finally:
        kubectl(
            "delete", "-f", str(EXAMPLES / "pod-dev-shm.yaml"), "--ignore-not-found", "--wait=false"
        )
        kubectl("delete", "namespace", "ml", "--ignore-not-found", "--wait=false")


def agent_token(node: Node, kube: Kube) -> str:
    """The token the kubelet projected into the agent's pod (its volume on the host)."""
    (agent,) = wait_ready(kube, NAMESPACE, "app.kubernetes.io/component=agent")
    volumes = node.kubelet_root / "pods" / agent["metadata"]["uid"] / "volumes"
    (token,) = volumes.glob("kubernetes.io~projected/kube-api-access-*/token")
    return token.read_text()


def test_the_agents_projected_token_writes_only_its_own_nodes_report(
    release: Release, kube: Kube, node: Node, plane: Any
) -> None:
    context = ssl.create_default_context(cafile=str(plane.pki / "ca.crt"))
    as_agent = Kube(plane.url, context, token=agent_token(node, kube))
    wait_until(
        lambda: report(kube, node) is not None,
        timeout=120,
        interval=0.5,
        message="the agent's NodeMemoryReport",
    )
    assert as_agent.get_object(REPORTS, node.name) is not None
    other = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryReport",
        "metadata": {"name": "another-node"},
    }
    with pytest.raises(ApiError) as refused:
        as_agent.create_object(REPORTS, other)
    assert refused.value.status == 403
    assert (
        f"the nodemem agent of node {node.name} may only write the NodeMemoryReport named "
        f"{node.name}, not another-node"
    ) in refused.value.message
    policy = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "from-the-agent"},
        "spec": {},
    }
    with pytest.raises(ApiError) as forbidden:
        as_agent.create_object(POLICIES, policy)
    assert forbidden.value.status == 403
    assert 'cannot create resource "nodememorypolicies"' in forbidden.value.message


def oom_policy(namespace: str, value: int) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "nodemem.dev/v1alpha1",
            "kind": "NodeMemoryPolicy",
            "metadata": {"name": f"{namespace}-oom"},
            "spec": {
                "oom": [
                    {
                        "name": "batch-first",
                        "match": {
                            "namespace": namespace,
                            "labelSelector": {"matchLabels": {"tier": "batch"}},
                        },
                        "oomScoreAdj": value,
                    }
                ]
            },
        }
    )


def oom_score_adj(pid: int) -> int:
    return read_oom_score_adj(HostPaths(), pid)  # one read(2): see its docstring


def wait_oom_score_adj(pid: int, value: int, timeout: float = 90) -> None:
    """Until the agent gave `pid` the rule's `value` (at most a resync away)."""
    wait_until(
        lambda: oom_score_adj(pid) == value,
        timeout=timeout,
        interval=0.2,
        message=lambda: f"oom_score_adj {value} (now {oom_score_adj(pid)})",
    )


def test_an_oom_rule_gives_a_real_containers_process_its_value(
    release: Release, kube: Kube, node: Node, kubectl: Callable[..., str]
) -> None:
    wait_ready(kube, NAMESPACE, "app.kubernetes.io/component=agent")
    try:
        # Burstable: the kubelet gives it 1000 - 1000 * request / capacity at creation.
        pod = run_pod(kube, "e2e-batch", "job", {"tier": "batch"}, {"requests": {"memory": "64Mi"}})
        pid = container_pid(node, pod)
        assert oom_score_adj(pid) != 900
        kubectl("apply", "-f", "-", stdin=oom_policy("e2e-batch", 900))  # applied at once
        sandbox = sandbox_pid(pod)
        sandbox_before = oom_score_adj(sandbox)
        wait_oom_score_adj(pid, 900)
        assert oom_score_adj(sandbox) == sandbox_before  # the pod's pause is left alone
        out = kubectl("describe", "nmp", "e2e-batch-oom")
        assert "e2e-batch-oom" in out
    finally:
        kubectl("delete", "nmp", "e2e-batch-oom", "--ignore-not-found", "--wait=false")
        kubectl("delete", "namespace", "e2e-batch", "--ignore-not-found", "--wait=false")


def test_a_second_node_on_this_machine_is_refused(node: Node, tmp_path: Path) -> None:
    other = Node(ControlPlane(tmp_path / "other-plane"))
    with pytest.raises(SystemExit, match="another node runs on this machine"):
        other.up()


def restart_window(node: Node, pod: dict[str, Any], value: int) -> tuple[int, float]:
    """Kill the pod's container; the kubelet starts it again. For the new container's
    process: the oom_score_adj first read after its exec (the kubelet's, unless the
    agent was faster) and the seconds from its exec until it holds `value`."""
    cgroup_part = f"pod{pod['metadata']['uid']}/"
    with ProcConnector() as events:
        os.kill(container_pid(node, pod), signal.SIGKILL)  # our pod's process
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            events.wait(0.5)
            for event in events.read_events():
                if not isinstance(event, ProcEvent) or event.what is not EventType.EXEC:
                    continue
                try:
                    comm = Path(f"/proc/{event.tgid}/comm").read_text().strip()
                    cgroup = Path(f"/proc/{event.tgid}/cgroup").read_text()
                    first = oom_score_adj(event.tgid)
                except OSError:
                    continue
                if comm != "sleep" or cgroup_part not in cgroup:
                    continue
                while oom_score_adj(event.tgid) != value:
                    assert time.monotonic() < deadline, "the agent never set the rule's value"
                    time.sleep(0.001)
                return first, (time.monotonic_ns() - event.timestamp_ns) / 1e9
    raise AssertionError("the restarted container's exec was not seen")


def test_who_wins_on_a_container_restart(
    release: Release, kube: Kube, node: Node, kubectl: Callable[..., str]
) -> None:
    """The kubelet gives each new container the oom_score_adj of its QoS class; the
    agent's rule replaces it at the next resync (in the pod's network namespace, the
    default: no proc connector) or at exec (hostNetwork and NET_ADMIN: the proc
    connector); with the NRI plugin the runtime sets it before the process runs."""
    kubectl("apply", "-f", "-", stdin=oom_policy("e2e-restart", 900))
    results: dict[str, tuple[int, float]] = {}
    try:
        modes = (("pod network", False), ("hostNetwork+NET_ADMIN", True), ("NRI plugin", None))
        for mode, host_network in modes:
            if host_network is None:
                # The chart's default network again, and the plugin beside the agent.
                nri = {"enabled": True, "socketDir": str(node.nri_socket.parent)}
                release.upgrade(nri=nri)
                wait_until(
                    lambda: (
                        [
                            (p["spec"].get("hostNetwork", False), len(p["spec"]["containers"]))
                            for p in pods(kube, NAMESPACE, "app.kubernetes.io/component=agent")
                            if ready(p)
                        ]
                        == [(False, 2)]
                    ),
                    timeout=POD_TIMEOUT,
                    interval=0.5,
                    message=lambda: (
                        f"the agent with the NRI plugin: {describe_pods(kube, NAMESPACE)}"
                    ),
                )
            elif host_network:
                release.upgrade(
                    hostNetwork=True,
                    metricsPort=18080,
                    # 6.18.44 here refuses the proc connector without it.
                    extraCapabilities=["DAC_OVERRIDE", "FOWNER", "NET_ADMIN"],
                )
                wait_until(
                    lambda: all(
                        p["spec"].get("hostNetwork") and ready(p)
                        for p in pods(kube, NAMESPACE, "app.kubernetes.io/component=agent")
                    ),
                    timeout=POD_TIMEOUT,
                    interval=0.5,
                    message="the agent's pod in the node's network namespace",
                )
            else:
                wait_ready(kube, NAMESPACE, "app.kubernetes.io/component=agent")
            pod = run_pod(
                kube,
                "e2e-restart",
                f"job-{len(results)}",
                {"tier": "batch", "run": str(len(results))},
                {"requests": {"memory": "64Mi"}},
            )
            wait_oom_score_adj(container_pid(node, pod), 900)
            results[mode] = restart_window(node, pod, 900)
    finally:
        release.upgrade()
        kubectl("delete", "nmp", "e2e-restart-oom", "--ignore-not-found", "--wait=false")
        kubectl("delete", "namespace", "e2e-restart", "--ignore-not-found", "--wait=false")
    print(f"\nrestart window: {json.dumps(results)}")
    first, window = results["pod network"]
    assert first != 900  # the kubelet's Burstable value stood first
    assert window <= 30 + 5  # until the next resync (the chart's resyncSeconds)
    _, window = results["hostNetwork+NET_ADMIN"]
    assert window < 1.0  # the exec event
    first, window = results["NRI plugin"]
    assert first == 900  # set by the runtime before the process ran: no window at all


def caps_policy(namespace: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "nodemem.dev/v1alpha1",
            "kind": "NodeMemoryPolicy",
            "metadata": {"name": f"{namespace}-probe"},
            "spec": {
                "tmpfs": [
                    {
                        "podShm": True,
                        "pods": {
                            "namespace": namespace,
                            "labelSelector": {"matchLabels": {"shm": "yes"}},
                        },
                        "size": "128Mi",
                    }
                ],
                "oom": [
                    {
                        "name": "probe",
                        "match": {
                            "namespace": namespace,
                            "labelSelector": {"matchLabels": {"group": "caps"}},
                        },
                        "oomScoreAdj": 900,
                    }
                ],
            },
        }
    )


def agent_capabilities(pod: dict[str, Any]) -> list[str]:
    return list(pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"])


def agent_resynced(node: Node, pod: dict[str, Any], matched: int = 2) -> str:
    """The agent pod's log once two resyncs matched `matched` processes: the second began
    after the pods were known (they may arrive in the middle of the first)."""
    meta = pod["metadata"]
    logs = node.root / "pod-logs" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
    text = "".join(p.read_text(errors="replace") for p in sorted(logs.glob("agent/*.log")))
    return text if text.count(f"oom rules: {matched} matched") >= 2 else ""


PAUSED = "/spec/template/spec/nodeSelector/nodemem-e2e~1paused"
ADDED_CAPABILITIES = "/spec/template/spec/containers/0/securityContext/capabilities/add"


def patch_agent(kubectl: Callable[..., str], *operations: dict[str, Any]) -> None:
    kubectl(
        "-n",
        NAMESPACE,
        "patch",
        "daemonset",
        AGENT,
        "--type",
        "json",
        "-p",
        json.dumps(list(operations)),
    )


def agent_paused(kube: Kube, kubectl: Callable[..., str]) -> None:
    """The agent's DaemonSet selects no node: its pod is gone (nothing enforces)."""
    patch_agent(kubectl, {"op": "add", "path": PAUSED, "value": "true"})
    wait_until(
        lambda: not pods(kube, NAMESPACE, "app.kubernetes.io/component=agent"),
        timeout=POD_TIMEOUT,
        interval=0.5,
        message="the agent's pod to be gone",
    )


def agent_with(
    kube: Kube, node: Node, kubectl: Callable[..., str], caps: list[str]
) -> dict[str, Any]:
    """The paused agent back with exactly `caps` added; its pod once Ready and through
    two resyncs."""
    patch_agent(
        kubectl,
        {"op": "remove", "path": PAUSED},
        {"op": "replace", "path": ADDED_CAPABILITIES, "value": caps},
    )
    selector = "app.kubernetes.io/component=agent"
    wait_until(
        lambda: (
            [agent_capabilities(p) for p in pods(kube, NAMESPACE, selector) if ready(p)] == [caps]
        ),
        timeout=POD_TIMEOUT,
        interval=0.5,
        message=lambda: f"the agent with {caps}: {describe_pods(kube, NAMESPACE)}",
    )
    (agent,) = pods(kube, NAMESPACE, selector)
    wait_until(
        lambda: agent_resynced(node, agent),
        timeout=60,
        interval=0.5,
        message=f"two resyncs of the agent with {caps}",
    )
    return agent


def test_each_of_the_agents_capabilities_is_needed_and_together_they_suffice(
    release: Release, kube: Kube, node: Node, kubectl: Callable[..., str]
) -> None:
    """The agent's DaemonSet patched to drop one capability at a time; after the new pod's
    second resync, what it could still do to two pods of its policy: size one's /dev/shm
    and set both pods' processes' oom_score_adj (they run as the image's user, 65532)."""
    namespace = "e2e-caps"
    release.upgrade(resyncSeconds=5)  # each variant's second resync soon
    (agent,) = wait_ready(kube, NAMESPACE, "app.kubernetes.io/component=agent")
    granted = agent_capabilities(agent)
    results: dict[str, dict[str, Any]] = {}
    try:
        shm_pod = run_pod(kube, namespace, "shm", {"group": "caps", "shm": "yes"})
        plain_pod = run_pod(kube, namespace, "plain", {"group": "caps", "shm": "no"})
        shm_pid, plain_pid = container_pid(node, shm_pod), container_pid(node, plain_pod)
        kubelet_adj = {pid: oom_score_adj(pid) for pid in (shm_pid, plain_pid)}
        assert 900 not in kubelet_adj.values()  # the kubelet's, before any policy
        kubectl("apply", "-f", "-", stdin=caps_policy(namespace))
        shm = f"/proc/{shm_pid}/root/dev/shm"
        # One at a time; and DAC_READ_SEARCH with DAC_OVERRIDE, which overrides it too.
        variants: list[tuple[str, ...]] = [(), *((c,) for c in granted)]
        variants.append(("DAC_OVERRIDE", "DAC_READ_SEARCH"))
        for dropped in variants:
            agent_paused(kube, kubectl)
            # Put back what the agent changed: the sandbox's size, the kubelet's values.
            reconfigure_tmpfs(shm, {"size": str(64 << 20)})
            for pid, value in kubelet_adj.items():
                Path(f"/proc/{pid}/oom_score_adj").write_text(str(value))
            agent = agent_with(kube, node, kubectl, [c for c in granted if c not in dropped])
            log = agent_resynced(node, agent)
            stat = os.statvfs(shm)
            results["-".join(dropped) or "none"] = {
                "shm": stat.f_blocks * stat.f_frsize >> 20,
                "adj": [oom_score_adj(shm_pid), oom_score_adj(plain_pid)],
                "log": [
                    line.split(" F ", 1)[-1]
                    for line in log.splitlines()
                    if "tmpfs" in line
                    or "oom rules" in line
                    or "WARNING" in line
                    or "ERROR" in line
                ][-6:],
            }
    finally:  # the chart's own capabilities again, on the node again
        patch_agent(kubectl, {"op": "replace", "path": ADDED_CAPABILITIES, "value": granted})
        kubectl(
            "-n",
            NAMESPACE,
            "patch",
            "daemonset",
            AGENT,
            "--type",
            "merge",
            "-p",
            json.dumps(
                {"spec": {"template": {"spec": {"nodeSelector": {"nodemem-e2e/paused": None}}}}}
            ),
        )
        kubectl("delete", "nmp", f"{namespace}-probe", "--ignore-not-found", "--wait=false")
        kubectl("delete", "namespace", namespace, "--ignore-not-found", "--wait=false")
    print("\ncapabilities: " + json.dumps(results, indent=1))
    kubelets = sorted(kubelet_adj.values())
    done = {"shm": 128, "adj": [900, 900]}

    def outcome(dropped: str) -> dict[str, Any]:
        return {"shm": results[dropped]["shm"], "adj": results[dropped]["adj"]}

    assert outcome("none") == done  # sufficient
    # SYS_ADMIN: the remount (fspick/fsconfig) of the pod's /dev/shm is refused.
    assert outcome("SYS_ADMIN") == {"shm": 64, "adj": [900, 900]}
    # SYS_PTRACE: the pod's processes (other capabilities than the agent's) cannot be
    # read, so no /dev/shm is found.
    assert outcome("SYS_PTRACE") == {"shm": 64, "adj": [900, 900]}
    assert any("no running process" in line for line in results["SYS_PTRACE"]["log"])
    # DAC_OVERRIDE: oom_score_adj of processes of another user (65532) is refused.
    assert outcome("DAC_OVERRIDE") == {"shm": 128, "adj": kubelets}
    assert any("Forbidden" in line for line in results["DAC_OVERRIDE"]["log"])
    if "SYS_RESOURCE" in results:
        assert outcome("SYS_RESOURCE") == done  # only for values below a floor
    # DAC_READ_SEARCH adds nothing while DAC_OVERRIDE is granted (it overrides reads
    # too); FOWNER is for cleanups in sticky directories, which need the host's root
    # (/proc/1/root, refused on this machine). Neither breaks what this probe does.
    assert outcome("DAC_READ_SEARCH") == done
    assert outcome("FOWNER") == done
    assert outcome("DAC_OVERRIDE-DAC_READ_SEARCH") == outcome("DAC_OVERRIDE")
