"""Benchmark: the controller at cluster scale, against a real control plane.

Starts a private control plane (etcd, kube-apiserver, kube-controller-manager built by
hack/cluster/controlplane.py, in a temporary directory) with nodemem's CRDs and the
chart's ServiceAccounts, RBAC and admission policy. Creates N Nodes (default 5,000),
their Leases (renewed like kubelets do, so that the node lifecycle controller leaves the
Nodes Ready) and NodeMemoryReports (realistic statuses, each listing every policy that
selects its node) and 20 NodeMemoryPolicies with varied nodeSelectors (5 of them at
generation 2, some nodes still at generation 1, some refusals, one policy selecting
nothing), from a pool of keep-alive HTTPS connections; how long that takes is reported.
The controller runs in a separate process (``python -m nodemem.cli controller``) with a
token of the chart's controller ServiceAccount (so RBAC is the chart's), so that its
RSS is its own. Measures:

- cold start: controller started after the objects exist, until every policy's
  status equals the one computed here, independently, from the labels and reports
  (observedGeneration, node counts, unaccounted Shmem, nodes over the threshold);
- steady state: R report status changes per second (default 100) for S seconds, each
  changing a roll-up result (a tmpfs item flipped Applied <-> Refused, or a new
  unaccountedBytes); lag from the last change until every policy status reflects it,
  and how stale the statuses got during the run;
- the controller's RSS (VmRSS, VmHWM from /proc/PID/status), and the control plane's
  (VmHWM of etcd, kube-apiserver and kube-controller-manager): what the server costs;
- the controller's requests, from the API server's audit log (its ServiceAccount user);
- the floor (baseline, same run, same server, same token): a bare kopf ``on.event``
  watcher on the same three kinds (no roll-up) in its own process, cold-started against
  the same objects.

Goals (the issue): cold start <= 30 s, lag <= 10 s, RSS <= 300 MiB; no report deleted.
``--profile`` runs the controller under cProfile and prints its hottest functions (the
figures are then slower); ``--controller-script FILE`` runs FILE instead of
``-m nodemem.cli`` (same arguments), to measure a candidate fix without editing the package.
Usage: ``python bench/controller_scale.py [--nodes 5000] [--policies 20] [--seconds 30]
[--workers 16] [--lease-interval 30]``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import (  # noqa: E402
    CONTROLLER_USER,
    Cluster,
    Kube,
    NodeLeases,
    control_plane_lines,
    in_parallel,
    private_cluster,
    proc_memory,
    process_cpu_seconds,
)

POLICIES = "nodemem.dev/v1alpha1/nodememorypolicies"
REPORTS = "nodemem.dev/v1alpha1/nodememoryreports"
NODES = "v1/nodes"
GiB, MiB = 1 << 30, 1 << 20
GOAL_COLD, GOAL_LAG, GOAL_RSS_MIB = 30.0, 10.0, 300.0
Selector = dict[str, Any]
Outcome = tuple[int, int, int, int, int, int, int]
"""What is compared: observedGeneration, matched, applied, failed, pending,
shmem.unaccountedBytes, shmem.nodesOverThreshold."""


# ------------------------------------------------------------------------------------------
# The cluster: labels, policies, reports, and the expected roll-up computed independently
# ------------------------------------------------------------------------------------------

POOLS = ("web", "web", "web", "web", "db", "db", "batch", "batch", "gpu", "infra")
ZONE = "topology.kubernetes.io/zone"


def node_labels(index: int, name: str) -> dict[str, str]:
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        # What kubelets also set; else the node controller adds them (a label change).
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": ("m6i.2xlarge", "r6i.4xlarge")[index % 2],
        ZONE: f"eu-west-1{'abc'[index % 3]}",
        "pool": POOLS[index % 10],
        "kernel": "6.6" if index % 4 else "6.1",
    }
    if index % 7 == 0:
        labels["tier"] = "critical"
    return labels


def _labels(**pairs: str) -> Selector:
    return {"matchLabels": dict(pairs)}


def _expr(key: str, operator: str, *values: str) -> dict[str, Any]:
    expression: dict[str, Any] = {"key": key, "operator": operator}
    if values:
        expression["values"] = list(values)
    return expression


# name, nodeSelector, shmem.unaccountedThreshold (None: none)
POLICY_TEMPLATES: list[tuple[str, Selector, str | None]] = [
    ("all-nodes", {}, "1Gi"),
    ("linux", _labels(**{"kubernetes.io/os": "linux"}), "10%"),
    ("pool-web", _labels(pool="web"), "512Mi"),
    ("pool-db", _labels(pool="db"), "1Gi"),
    ("pool-batch", _labels(pool="batch"), None),
    ("pool-gpu", _labels(pool="gpu"), "5%"),
    ("pool-infra", _labels(pool="infra"), "1Gi"),
    ("zone-a", _labels(**{ZONE: "eu-west-1a"}), None),
    ("zone-b-c", {"matchExpressions": [_expr(ZONE, "In", "eu-west-1b", "eu-west-1c")]}, "1Gi"),
    ("critical", {"matchExpressions": [_expr("tier", "Exists")]}, "256Mi"),
    ("not-critical", {"matchExpressions": [_expr("tier", "DoesNotExist")]}, "2Gi"),
    ("not-gpu-infra", {"matchExpressions": [_expr("pool", "NotIn", "gpu", "infra")]}, "1Gi"),
    ("web-zone-a", _labels(pool="web", **{ZONE: "eu-west-1a"}), "1Gi"),
    (
        "db-critical",
        {"matchLabels": {"pool": "db"}, "matchExpressions": [_expr("tier", "Exists")]},
        "768Mi",
    ),
    ("kernel-6-6", _labels(kernel="6.6"), "10%"),
    ("batch-or-gpu", {"matchExpressions": [_expr("pool", "In", "batch", "gpu")]}, "1Gi"),
    (
        "web-old-kernel",
        {"matchLabels": {"pool": "web"}, "matchExpressions": [_expr("kernel", "In", "6.1")]},
        None,
    ),
    ("critical-zone-c", {"matchLabels": {"tier": "critical", ZONE: "eu-west-1c"}}, "1Gi"),
    ("no-such-pool", _labels(pool="none"), "1Gi"),
    ("all-but-web", {"matchExpressions": [_expr("pool", "NotIn", "web")]}, "3%"),
]
BUMPED = 5  # the last 5 policies get a spec change after creation: generation 2


def matches(selector: Selector, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics, written here again on purpose (not nodemem's)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


def threshold_bytes(text: str, total: int) -> int:
    if text.endswith("%"):
        return -(-total * int(text[:-1]) // 100)
    units = {"Ki": 1 << 10, "Mi": MiB, "Gi": GiB}
    return int(text[:-2]) * units[text[-2:]]


@dataclass
class PolicyInfo:
    name: str
    selector: Selector
    threshold: str | None
    generation: int = 1
    nodes: list[int] = field(default_factory=list)  # indexes of the nodes it selects


@dataclass
class NodeState:
    """What one node's agent reports, as the bench models it (status rendered from it)."""

    index: int
    name: str
    labels: dict[str, str]
    total: int
    has_status: bool
    listed: dict[str, int]  # policy -> generation the agent applied
    refused: set[str]  # policies whose tmpfs item was refused
    unaccounted: int
    uid: str = ""
    policies: list[int] = field(default_factory=list)  # indexes of the policies selecting it


class Model:
    """Expected policy outcomes, kept incrementally as reports change."""

    def __init__(self, policies: list[PolicyInfo], nodes: list[NodeState]) -> None:
        self.policies = policies
        self.nodes = nodes
        self.agg = [[0] * 5 for _ in policies]  # applied, failed, pending, unaccounted, over
        for node in nodes:
            for p in node.policies:
                self._add(p, node, +1)

    def contribution(self, p: int, node: NodeState) -> tuple[int, int, int, int, int]:
        policy = self.policies[p]
        listed = node.has_status and node.listed.get(policy.name) == policy.generation
        applied = failed = pending = 0
        if not listed:
            pending = 1
        elif policy.name in node.refused:
            failed = 1
        else:
            applied = 1
        unaccounted = node.unaccounted if node.has_status else 0
        over = 0
        if node.has_status and policy.threshold is not None:
            over = int(node.unaccounted > threshold_bytes(policy.threshold, node.total))
        return applied, failed, pending, unaccounted, over

    def _add(self, p: int, node: NodeState, sign: int) -> None:
        for i, value in enumerate(self.contribution(p, node)):
            self.agg[p][i] += sign * value

    def change(self, node: NodeState, mutate: Callable[[], None]) -> list[int]:
        """Apply a change to a node's report; returns the policies whose outcome moved."""
        before = [self.outcome(p) for p in node.policies]
        for p in node.policies:
            self._add(p, node, -1)
        mutate()
        for p in node.policies:
            self._add(p, node, +1)
        return [p for p, old in zip(node.policies, before, strict=True) if self.outcome(p) != old]

    def outcome(self, p: int) -> Outcome:
        policy = self.policies[p]
        applied, failed, pending, unaccounted, over = self.agg[p]
        return (policy.generation, len(policy.nodes), applied, failed, pending, unaccounted, over)


def observed(obj: Mapping[str, Any] | None) -> Outcome | None:
    status = (obj or {}).get("status") or {}
    if "observedGeneration" not in status:
        return None
    nodes = status.get("nodes") or {}
    shmem = status.get("shmem") or {}
    return (
        status["observedGeneration"],
        nodes.get("matched", 0),
        nodes.get("applied", 0),
        nodes.get("failed", 0),
        nodes.get("pending", 0),
        shmem.get("unaccountedBytes", 0),
        shmem.get("nodesOverThreshold", 0),
    )


# ------------------------------------------------------------------------------------------
# Objects as the API holds them
# ------------------------------------------------------------------------------------------

STAMP = "2026-05-01T10:00:00Z"


def node_ttl(count: int) -> int:
    """The TTL annotation kube-controller-manager's ttl controller settles on for a
    cluster of ``count`` nodes (its boundaries, going up); set at creation, it patches
    fewer Nodes."""
    for size_max, ttl in ((100, 0), (500, 15), (1000, 30), (2000, 60)):
        if count <= size_max:
            return ttl
    return 300


def node_object(node: NodeState, ttl: int = 0) -> dict[str, Any]:
    """A Node about the size of a real one (~3 KB: conditions, addresses, images)."""
    i, name = node.index, node.name
    memory_ki = node.total // 1024
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    conditions = [
        {
            "type": type_,
            "status": "True" if type_ == "Ready" else "False",
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": STAMP,
            "lastTransitionTime": STAMP,
        }
        for type_, reason, message in (
            ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
            ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "KubeletReady", "kubelet is posting ready status"),
        )
    ]
    images = [
        {"names": [f"registry.example.com/team-{k}/service-{k}@sha256:{k:064x}"], "sizeBytes": k}
        for k in range(1, 9)
    ]
    capacity = {"cpu": "8", "memory": f"{memory_ki}Ki", "pods": "110", "hugepages-2Mi": "0"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": node.labels,
            "annotations": {
                "node.alpha.kubernetes.io/ttl": str(ttl),
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {"podCIDR": f"100.{i >> 8 & 255}.{i & 255}.0/24", "providerID": f"aws:///{i:x}"},
        "status": {
            "capacity": capacity,
            "allocatable": {**capacity, "memory": f"{memory_ki - 1048576}Ki"},
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": ip},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                "machineID": f"{i:032x}",
                "systemUUID": f"ec2{i:029x}",
                "bootID": f"{i:08x}-0000-4000-8000-000000000000",
                "kernelVersion": "6.6.58" if node.labels["kernel"] == "6.6" else "6.1.112",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "containerRuntimeVersion": "containerd://1.7.22",
                "kubeletVersion": "v1.31.2",
                "kubeProxyVersion": "v1.31.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "images": images,
        },
    }


def report_status(node: NodeState) -> dict[str, Any]:
    """A report's status as the agent writes it (the shape of tests/kube/test_controller.py,
    plus what a real node has: one tmpfs item per policy, the largest objects, conditions)."""
    tmpfs = []
    for name in node.listed:
        refused = name in node.refused
        item: dict[str, Any] = {
            "path": f"/run/nodemem/{name}",
            "pattern": f"/run/nodemem/{name}",
            "policy": name,
            "state": "Refused" if refused else "Applied",
            "message": "Too small a size for current use" if refused else "",
            "sizeBytes": 64 * MiB,
            "usedBytes": (80 if refused else 12) * MiB,
            "desiredBytes": 64 * MiB,
        }
        tmpfs.append(item)
    shmem_total = 3 * GiB
    unaccounted = node.unaccounted
    attributed = shmem_total - unaccounted
    top = [
        {
            "kind": kind,
            "name": object_name,
            "bytes": size,
            "pids": [{"pid": 1000 + k, "comm": "postgres"}] if kind != "tmpfs" else [],
            "note": "",
        }
        for k, (kind, object_name, size) in enumerate(
            (
                ("tmpfs", "/dev/shm", attributed // 2),
                ("memfd", "memfd:pgshm", attributed // 4),
                ("sysv", "shmid 32769", attributed // 8),
                ("tmpfs", "/run", attributed // 16),
                ("sharedAnon", "/dev/zero", attributed // 32),
            )
        )
    ]
    by_kind = {
        "tmpfs": attributed // 2 + attributed // 16,
        "sysv": attributed // 8,
        "memfd": attributed // 4,
        "sharedAnon": 0,
        "detachedTmpfs": 0,
    }
    by_kind["sharedAnon"] = attributed - sum(by_kind.values())
    failed = [name for name in node.listed if name in node.refused]
    conditions = [
        {
            "type": "Applied",
            "status": "False" if failed else "True",
            "reason": "ItemsFailed" if failed else "AllItemsApplied",
            "message": "; ".join(f"tmpfs /run/nodemem/{n}: Refused" for n in failed),
            "lastTransitionTime": STAMP,
        },
        {
            "type": "Degraded",
            "status": "True" if failed else "False",
            "reason": "ItemsFailed" if failed else "NoFailures",
            "message": "",
            "lastTransitionTime": STAMP,
        },
        {
            "type": "ShmemLeakSuspected",
            "status": "True" if unaccounted > GiB else "False",
            "reason": "UnaccountedAboveThreshold" if unaccounted > GiB else "BelowThreshold",
            "message": "",
            "lastTransitionTime": STAMP,
        },
    ]
    return {
        "policies": [{"name": name, "generation": gen} for name, gen in node.listed.items()],
        "memory": {
            "totalBytes": node.total,
            "availableBytes": node.total // 2,
            "shmemBytes": shmem_total,
            "slabBytes": 600 * MiB,
            "slabReclaimableBytes": 400 * MiB,
            "slabUnreclaimableBytes": 200 * MiB,
            "kernelStackBytes": 30 * MiB,
            "pageTablesBytes": 90 * MiB,
            "vmallocUsedBytes": 50 * MiB,
            "processRssBytes": node.total // 3,
        },
        "shmem": {
            "totalBytes": shmem_total,
            "attributedBytes": attributed,
            "unaccountedBytes": unaccounted,
            "byKind": by_kind,
            "top": top,
        },
        "unreadableProcesses": 0,
        "tmpfs": tmpfs,
        "conditions": conditions,
        "lastUpdateTime": STAMP,
    }


def build_model(node_count: int, policy_count: int, seed: int) -> Model:
    rng = random.Random(seed)
    templates = [
        POLICY_TEMPLATES[k % len(POLICY_TEMPLATES)] for k in range(policy_count)
    ]  # more than 20: the selectors repeat under new names
    policies = [
        PolicyInfo(f"{name}-{k // len(POLICY_TEMPLATES)}" if k >= 20 else name, sel, thr)
        for k, (name, sel, thr) in enumerate(templates)
    ]
    for policy in policies[-BUMPED:] if policy_count > BUMPED else []:
        policy.generation = 2
    nodes: list[NodeState] = []
    for i in range(node_count):
        name = f"node-{i:05d}"
        labels = node_labels(i, name)
        node = NodeState(
            index=i,
            name=name,
            labels=labels,
            total=(16, 32, 64)[(i // 3) % 3] * GiB,
            has_status=i % 50 != 11,  # 2%: the agent has not written its report yet
            listed={},
            refused=set(),
            unaccounted=rng.randrange(0, 33) * 64 * MiB,
        )
        for p, policy in enumerate(policies):
            if matches(policy.selector, labels):
                node.policies.append(p)
                policy.nodes.append(i)
                lagging = i % 20 == 3 and policy.generation > 1  # 5%: an older generation
                node.listed[policy.name] = policy.generation - 1 if lagging else policy.generation
        if i % 23 == 0 and node.policies:  # ~4%: the first item of the node is refused
            node.refused.add(policies[node.policies[0]].name)
        nodes.append(node)
    return Model(policies, nodes)


def policy_object(policy: PolicyInfo) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeSelector": policy.selector,
        "tmpfs": [{"path": f"/run/nodemem/{policy.name}", "size": "64Mi"}],
        "oom": [
            {"name": "protect-kubelet", "match": {"comm": "^kubelet$"}, "oomScoreAdj": -999},
            {"name": "batch-first", "match": {"comm": "^(spark|python3?)$"}, "oomScoreAdj": 500},
        ],
    }
    if policy.threshold is not None:
        spec["shmem"] = {"unaccountedThreshold": policy.threshold}
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": policy.name},
        "spec": spec,
    }


def populate(
    api: Kube, model: Model, leases: NodeLeases | None, workers: int
) -> list[tuple[str, int, float]]:
    """Create everything over HTTPS from ``workers`` keep-alive connections (the real
    server: admission, validation against the CRDs' schemas, etcd). Returns (what, how
    many, seconds)."""
    timings: list[tuple[str, int, float]] = []
    ttl = node_ttl(len(model.nodes))

    def timed(what: str, items: list[Any], create: Callable[[Any], None], threads: int) -> None:
        count, seconds = in_parallel(create, items, threads)
        timings.append((what, count, seconds))

    def create_node(node: NodeState) -> None:
        node.uid = api.create_object(NODES, node_object(node, ttl))["metadata"]["uid"]
        if leases is not None:  # at once: the node controller's grace period is 50 s
            leases.add(node.name, node.uid)

    def create_report(node: NodeState) -> None:
        owner = {"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid}
        body = {
            "apiVersion": "nodemem.dev/v1alpha1",
            "kind": "NodeMemoryReport",
            "metadata": {"name": node.name, "ownerReferences": [owner]},
        }
        api.create_object(REPORTS, body)

    def write_status(node: NodeState) -> None:
        status = report_status(node)
        api.patch_object(REPORTS, node.name, {"status": status}, subresource="status")

    def create_policy(policy: PolicyInfo) -> None:
        api.create_object(POLICIES, policy_object(policy))
        if policy.generation > 1:  # a spec change: generation 2
            api.patch_object(POLICIES, policy.name, {"spec": {"priority": 10}})
            got = api.get_object(POLICIES, policy.name)
            assert got is not None and got["metadata"]["generation"] == policy.generation

    timed("nodes + leases" if leases else "nodes", model.nodes, create_node, workers)
    timed("reports", model.nodes, create_report, workers)
    timed("report statuses", [n for n in model.nodes if n.has_status], write_status, workers)
    timed("policies", model.policies, create_policy, min(workers, 4))
    return timings


# ------------------------------------------------------------------------------------------
# Processes: the controller, the bare watcher, their memory
# ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # kopf stops gracefully; cProfile then writes
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "operator"), env.get("PYTHONPATH", "")])
    )
    return env


def watcher_main(kubeconfig: str, nodes: int, reports: int, policies: int) -> None:
    """The floor: kopf on.event on the controller's three kinds, handlers that only count.
    Prints one JSON line with the CLOCK_MONOTONIC time when every object was seen."""
    import kopf  # noqa: PLC0415  # only the child process needs kopf

    from nodemem.kube import kopf_login, load_client_config  # noqa: PLC0415

    registry = kopf.OperatorRegistry()
    seen: dict[str, set[str]] = {"nodes": set(), "reports": set(), "policies": set()}
    wanted = {"nodes": nodes, "reports": reports, "policies": policies}
    done = threading.Event()

    def counter(kind: str) -> Callable[..., Any]:
        async def handler(name: str, **_: Any) -> None:
            seen[kind].add(name)
            if not done.is_set() and all(len(seen[k]) >= wanted[k] for k in wanted):
                done.set()
                print(json.dumps({"seen": time.monotonic()}), flush=True)

        return handler

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # the controller's settings
        settings.scanning.disabled = True
        settings.watching.server_timeout = 300

    login = kopf_login(load_client_config(kubeconfig))
    kopf.on.login(registry=registry)(login)
    kopf.on.event("nodemem.dev", "v1alpha1", "nodememorypolicies", registry=registry)(
        counter("policies")
    )
    kopf.on.event("", "v1", "nodes", registry=registry)(counter("nodes"))
    kopf.on.event("nodemem.dev", "v1alpha1", "nodememoryreports", registry=registry)(
        counter("reports")
    )
    kopf.run(registry=registry, clusterwide=True, standalone=True)


def run_baseline(kubeconfig: Path, model: Model, timeout: float) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--watcher",
        str(kubeconfig),
        str(len(model.nodes)),
        str(len(model.nodes)),
        str(len(model.policies)),
    ]
    start = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=child_env()
    )
    result: dict[str, Any] = {"seconds": None, "rss": 0.0, "hwm": 0.0}
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(process.stdout or []), daemon=True, name="watcher-out"
    )
    reader.start()
    try:
        deadline = start + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if lines:
                result["seconds"] = json.loads(lines[0])["seen"] - start
                time.sleep(0.5)  # let the last events settle before reading memory
                break
            time.sleep(0.05)
        memory = proc_memory(process.pid)
        result["rss"], result["hwm"] = memory.rss_mib, memory.hwm_mib
    finally:
        stop_process(process)
    return result


@dataclass
class Controller:
    process: subprocess.Popen[Any]
    started: float
    log: Path
    profile: Path | None


def start_controller(kubeconfig: Path, workdir: Path, args: argparse.Namespace) -> Controller:
    log = workdir / "controller.log"
    prof = workdir / "controller.prof" if args.profile else None
    prefix = ["-m", "cProfile", "-o", str(prof)] if prof else []
    program = [args.controller_script] if args.controller_script else ["-m", "nodemem.cli"]
    command = [
        sys.executable,
        *prefix,
        *program,
        "controller",
        "--kubeconfig",
        str(kubeconfig),
        "--health-port",
        str(free_port()),
        "--interval",
        str(args.interval),
    ]
    with open(log, "w") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=workdir
        )
    return Controller(process, started, log, prof)


def rss(controller: Controller) -> float:
    return proc_memory(controller.process.pid).rss_mib


def cpu_seconds(cluster: Cluster, controller: Controller) -> dict[str, float]:
    """CPU time (user + system) so far of the controller, the control plane's processes
    and this one (the bench: the writes, the lease renewals, the polling)."""
    times = os.times()
    return {
        "controller": process_cpu_seconds(controller.process.pid),
        **cluster.cpu_seconds(),
        "bench": times.user + times.system,
    }


# ------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------


def observe_all(api: Kube, model: Model) -> list[Outcome | None]:
    """Every policy's status, from one list request."""
    by_name = {obj["metadata"]["name"]: obj for obj in api.list_objects(POLICIES)}
    return [observed(by_name.get(p.name)) for p in model.policies]


def cold_start(
    cluster: Cluster, model: Model, controller: Controller, timeout: float, mark: int
) -> dict[str, Any]:
    expected = [model.outcome(p) for p in range(len(model.policies))]
    t0 = controller.started
    marks: dict[str, float | None] = {"watching": None, "first": None, "matched": None}
    peak = 0.0
    current: float | None = None
    last: list[Outcome | None] = []
    watches: Counter[str] = Counter()
    tail = cluster.audit.follow(mark)
    while time.monotonic() - t0 < timeout:
        if controller.process.poll() is not None:
            raise SystemExit(f"the controller exited; see {controller.log}")
        now = time.monotonic() - t0
        peak = max(peak, rss(controller))
        if marks["watching"] is None:
            for event in tail.read():
                started = event.stage == "ResponseStarted" and event.verb == "watch"
                if started and event.user == CONTROLLER_USER:
                    watches[event.resource] += 1
            if all(watches[r] for r in (POLICIES, NODES, REPORTS)):
                marks["watching"] = now
        last = observe_all(cluster.admin, model)
        if marks["first"] is None and any(o is not None for o in last):
            marks["first"] = now
        if marks["matched"] is None and all(
            o is not None and o[:2] == e[:2] for o, e in zip(last, expected, strict=True)
        ):
            marks["matched"] = now
        if last == expected:
            current = now
            break
        time.sleep(0.05)
    memory = proc_memory(controller.process.pid)
    wrong = [
        (p.name, o, e)
        for p, o, e in zip(model.policies, last, expected, strict=True)
        if o != e and current is None
    ]
    return {
        **marks,
        "current": current,
        "rss": memory.rss_mib,
        "hwm": memory.hwm_mib,
        "peak": peak,
        "wrong": wrong,
    }


class Staleness:
    """Per-policy history of expected outcomes, to tell how old what the status shows is.

    Change k (1, 2, ...) is submitted in order, and written concurrently with others, so
    they complete out of order: the server surely holds the outcome after change k once
    changes 1..k have all completed (the time recorded for k). A status showing an older
    outcome is stale since the first change after it completed; one showing an outcome
    of no prefix (an interleaving of writes in flight) is counted, not scored."""

    def __init__(self, model: Model, start: float) -> None:
        self.entries: list[list[tuple[int, Outcome]]] = [
            [(0, model.outcome(p))] for p in range(len(model.policies))
        ]
        self.done_at: dict[int, float] = {0: start}
        self.done_upto = 0
        self.completed: set[int] = set()
        self.lock = threading.Lock()
        self.samples: list[float] = []
        self.unmatched = 0

    def submitted(self, k: int, moved: list[tuple[int, Outcome]]) -> None:
        with self.lock:
            for p, value in moved:
                self.entries[p].append((k, value))

    def complete(self, k: int, when: float) -> None:
        with self.lock:
            self.completed.add(k)
            while self.done_upto + 1 in self.completed:
                self.done_upto += 1
                self.completed.discard(self.done_upto)
                self.done_at[self.done_upto] = when

    def sample(self, p: int, seen: Outcome | None, now: float) -> None:
        """0 when the status shows the newest surely written outcome (or a newer one); else
        the time since the first change it does not show (optimistic: the newest earlier
        match is assumed)."""
        with self.lock:
            entries = self.entries[p]
            m = bisect.bisect_right([k for k, _ in entries], self.done_upto) - 1
            if any(value == seen for _, value in entries[m:]):
                self.samples.append(0.0)
                return
            j = next((i for i in range(m - 1, -1, -1) if entries[i][1] == seen), None)
            if j is None:
                self.unmatched += 1
                return
            self.samples.append(now - self.done_at[entries[j + 1][0]])


def steady_state(
    cluster: Cluster, model: Model, controller: Controller, args: argparse.Namespace
) -> dict[str, Any]:
    """The changes are decided and rendered here, in order, and written from
    ``--change-workers`` connections (one round trip at a time would cap a single one
    below the rate); at most that many writes are in flight: when the server cannot keep
    up, fewer changes are written in the S seconds (the rate achieved is reported). A
    node with a write in flight is not picked again, so that its writes cannot overtake
    each other."""
    api, audit = cluster.admin, cluster.audit
    rng = random.Random(args.seed + 1)
    candidates = [n for n in model.nodes if n.has_status and n.policies]
    mark = audit.mark()
    stop = threading.Event()
    changes: list[float] = []
    patch_seconds: list[float] = []
    failures: list[str] = []
    in_flight: set[int] = set()
    slots = threading.BoundedSemaphore(args.change_workers)
    lock = threading.Lock()
    staleness = Staleness(model, time.monotonic())
    rss_peak = [0.0]

    def change(k: int) -> tuple[int, NodeState, dict[str, Any]]:
        while True:
            node = rng.choice(candidates)
            with lock:
                if node.index not in in_flight:
                    in_flight.add(node.index)
                    break
        current = [
            model.policies[p].name
            for p in node.policies
            if node.listed.get(model.policies[p].name) == model.policies[p].generation
        ]
        if k % 2 == 0 and current:
            name = rng.choice(current)

            def mutate() -> None:
                node.refused.symmetric_difference_update({name})  # Applied <-> Refused

        else:
            old = node.unaccounted
            new = rng.choice([v for v in range(0, 33) if v * 64 * MiB != old]) * 64 * MiB

            def mutate() -> None:
                node.unaccounted = new

        moved = model.change(node, mutate)
        staleness.submitted(k + 1, [(p, model.outcome(p)) for p in moved])
        return k + 1, node, report_status(node)

    def write(k: int, node: NodeState, status: dict[str, Any]) -> None:
        begin = time.perf_counter()
        try:
            api.patch_object(REPORTS, node.name, {"status": status}, subresource="status")
        except Exception as error:  # counted, reported; the run goes on
            failures.append(f"{node.name}: {error}")
        when = time.monotonic()
        with lock:
            patch_seconds.append(time.perf_counter() - begin)
            changes.append(when)
            in_flight.discard(node.index)
        slots.release()
        staleness.complete(k, when)

    def poll() -> None:
        while not stop.is_set():
            now = time.monotonic()
            for p, seen in enumerate(observe_all(api, model)):
                staleness.sample(p, seen, now)
            rss_peak[0] = max(rss_peak[0], rss(controller))
            stop.wait(0.2)

    poller = threading.Thread(target=poll, name="poller", daemon=True)
    poller.start()
    start = time.monotonic()
    total = int(args.rate * args.seconds)
    pending: list[Future[None]] = []
    cpu_before = cpu_seconds(cluster, controller)
    with ThreadPoolExecutor(args.change_workers, thread_name_prefix="change") as pool:
        for k in range(total):
            delay = start + k / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            slots.acquire()
            if time.monotonic() >= start + args.seconds:
                slots.release()
                break
            pending.append(pool.submit(write, *change(k)))
    for future in pending:
        future.result()
    elapsed = max(changes) - start if changes else 0.0
    cpu_after = cpu_seconds(cluster, controller)
    stop.set()
    poller.join()
    during = list(staleness.samples)
    last_change = max(changes) if changes else time.monotonic()
    expected = [model.outcome(p) for p in range(len(model.policies))]
    lag: float | None = None
    while time.monotonic() - last_change < args.timeout:
        if observe_all(api, model) == expected:
            lag = time.monotonic() - last_change
            break
        time.sleep(0.02)
    memory = proc_memory(controller.process.pid)
    status_writes = audit.requests(
        since=mark, user=CONTROLLER_USER, verb=["patch"], resource=POLICIES
    )
    return {
        "changes": len(changes),
        "failures": failures,
        "elapsed": elapsed,
        "patch_ms": statistics.median(patch_seconds) * 1000 if patch_seconds else 0.0,
        "lag": lag,
        "stale_max": max(during, default=0.0),
        "stale_p50": statistics.median(during) if during else 0.0,
        "stale_p95": _percentile(during, 0.95),
        "stale_unscored": staleness.unmatched,
        "status_writes": len(status_writes),
        "rss": memory.rss_mib,
        "hwm": memory.hwm_mib,
        "peak": max(rss_peak[0], memory.rss_mib),
        "cpu": {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after},
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def controller_requests(cluster: Cluster, since: int) -> Counter[str]:
    """The controller's completed requests since ``since``, by verb and resource."""
    return Counter(
        f"{e.verb} {e.plural or '(non-resource)'}" + (f"/{e.subresource}" if e.subresource else "")
        for e in cluster.audit.requests(since=since, user=CONTROLLER_USER)
    )


def settle(
    cluster: Cluster, since: int, quiet: float, timeout: float
) -> tuple[float, Counter[str]]:
    """Until kube-controller-manager has stopped writing Nodes for ``quiet`` s (its ttl
    and node controllers patch new Nodes: annotations, labels): the controller is then
    measured on a settled cluster. (seconds waited, Node writes by user since ``since``)."""
    tail = cluster.audit.follow(since)
    writes: Counter[str] = Counter()
    started = last = time.monotonic()
    while time.monotonic() - started < timeout:
        for event in tail.read():
            if event.resource == NODES and event.verb in ("patch", "update") and event.user:
                writes[event.user] += 1
                if event.user != "admin":
                    last = time.monotonic()
        if time.monotonic() - last >= quiet:
            break
        time.sleep(0.2)
    return time.monotonic() - started, writes


def node_health(api: Kube) -> Counter[str]:
    """Nodes by Ready condition, and how many the node controller tainted unreachable."""
    health: Counter[str] = Counter()
    for node in api.list_objects(NODES):
        ready = next(
            (c["status"] for c in node["status"].get("conditions", []) if c["type"] == "Ready"),
            "none",
        )
        health[f"Ready={ready}"] += 1
        taints = node.get("spec", {}).get("taints") or []
        health["unreachable"] += any(t["key"] == "node.kubernetes.io/unreachable" for t in taints)
    return health


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------


def secs(value: float | None) -> str:
    return f"{value:6.1f} s" if value is not None else "   never"


def verdict(value: float | None, goal: float) -> str:
    return "ok" if value is not None and value <= goal else "MISSED"


def print_profile(path: Path, top: int = 30) -> None:
    import pstats  # noqa: PLC0415

    if not path.exists():
        print(f"\nno profile written at {path}")
        return
    print(f"\ncontroller profile ({path}), by own time:")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)
    print("by cumulative time:")
    stats.sort_stats("cumulative").print_stats(top)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--policies", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0, help="steady-state duration")
    parser.add_argument("--rate", type=float, default=100.0, help="report changes per second")
    parser.add_argument("--interval", type=float, default=1.0, help="controller --interval")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up a phase after")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workers", type=int, default=16, help="concurrent connections creating the objects"
    )
    parser.add_argument(
        "--change-workers",
        type=int,
        default=16,
        help="concurrent connections writing the steady-state report changes",
    )
    parser.add_argument(
        "--lease-interval",
        type=float,
        default=30.0,
        help="seconds between two renewals of each Node's Lease (a kubelet's: 10; 0: none, "
        "and the node controller marks every Node unreachable after ~50 s)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare watcher")
    parser.add_argument("--profile", action="store_true", help="run the controller in cProfile")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, profile)")
    parser.add_argument(
        "--controller-script",
        metavar="FILE",
        help="run this script instead of `-m nodemem.cli` (same arguments): to try a fix",
    )
    parser.add_argument("--watcher", nargs=4, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nodemem-controller-scale-"))
    try:
        yield path
    finally:
        if keep:
            print(f"\nwork dir kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.watcher:
        kubeconfig, nodes, reports, policies = args.watcher
        watcher_main(kubeconfig, int(nodes), int(reports), int(policies))
        return 0
    began = time.monotonic()
    model = build_model(args.nodes, args.policies, args.seed)
    failed = False
    with workdir(args.keep or args.profile) as work, private_cluster() as cluster:
        # The chart's controller identity: its RBAC is what the server enforces.
        token = cluster.controller_token(expiration=max(3600, int(args.timeout) * 4))
        kubeconfig = cluster.write_kubeconfig(work / "controller.kubeconfig", token)
        leases = None
        if args.lease_interval > 0:
            leases = NodeLeases(cluster.admin, args.lease_interval).start()
        try:
            setup_started = time.monotonic()
            setup_mark = cluster.audit.mark()
            timings = populate(cluster.admin, model, leases, args.workers)
            setup = time.monotonic() - setup_started
            settled, node_writes = settle(cluster, setup_mark, 5.0, min(60.0, args.timeout))
            print(f"controller_scale: {args.nodes} nodes and reports, {args.policies} policies")
            print(
                f"\nobjects created through the API server ({args.workers} keep-alive "
                f"connections), {setup:.1f} s in all"
            )
            for what, count, seconds in timings:
                print(f"  {what:<17} {count:>6}  {seconds:6.1f} s  {count / seconds:8.0f}/s")
            print(
                f"  waited {settled:.1f} s more for the controller manager to stop writing "
                "Nodes (5 s quiet, at most 60 s); Node patches since the first was created: "
                + (", ".join(f"{u} {n}" for u, n in node_writes.most_common()) or "none")
            )
            statuses = sum(n.has_status for n in model.nodes)
            print(
                f"  per policy: matched {min(len(p.nodes) for p in model.policies)}"
                f"..{max(len(p.nodes) for p in model.policies)} nodes; "
                f"{args.nodes - statuses} reports without status"
            )
            baseline: dict[str, Any] | None = None
            if not args.no_baseline:
                baseline = run_baseline(kubeconfig, model, args.timeout)
            mark = cluster.audit.mark()
            controller = start_controller(kubeconfig, work, args)
            try:
                cold = cold_start(cluster, model, controller, args.timeout, mark)
                steady = steady_state(cluster, model, controller, args) if cold["current"] else None
                uptime = time.monotonic() - controller.started
            finally:
                stop_process(controller.process)
            deletes = cluster.audit.requests(since=mark, verb=["delete"], resource=REPORTS)
            requests = controller_requests(cluster, mark)
            by_user = cluster.audit.per_user(since=mark)
            node_patches = Counter(
                e.user
                for e in cluster.audit.requests(
                    since=mark, verb=["patch", "update"], resource=NODES
                )
            )
            health = node_health(cluster.admin)
            memory = cluster.memory()
            plane_cpu = cluster.cpu_seconds()
        finally:
            if leases is not None:
                leases.stop()
        failed = report(
            args,
            cold=cold,
            steady=steady,
            baseline=baseline,
            deletes=Counter(e.user for e in deletes),
            uptime=uptime,
            controller=controller,
        )
        print(
            f"\ncontroller requests ({CONTROLLER_USER}, audit log), {uptime:.0f} s: "
            + ", ".join(f"{what} {n}" for what, n in sorted(requests.items()))
        )
        print(
            "all requests since the controller started, by user: "
            + ", ".join(f"{user} {n}" for user, n in by_user.most_common(6))
        )
        print(
            "Node patches while the controller ran (a no-op patch is no watch event): "
            + (", ".join(f"{u} {n}" for u, n in node_patches.most_common()) or "none")
        )
        lease_text = (
            f"Leases renewed every {args.lease_interval:g} s ({leases.renewals} renewals, "
            f"{len(leases.failures)} failed)"
            if leases is not None
            else "no Lease renewals"
        )
        print(
            f"nodes at the end: {health['Ready=True']} Ready, {health['unreachable']} tainted "
            f"unreachable; {lease_text}"
        )
        for line in control_plane_lines(memory, plane_cpu):
            print(line)
        if controller.profile is not None:
            print_profile(controller.profile)
    print(f"\nwhole run: {time.monotonic() - began:.0f} s")
    return 1 if failed else 0


def report(
    args: argparse.Namespace,
    *,
    cold: dict[str, Any],
    steady: dict[str, Any] | None,
    baseline: dict[str, Any] | None,
    deletes: Counter[str],
    uptime: float,
    controller: Controller,
) -> bool:
    """Print the phases and the summary table; True when a goal was missed."""
    print(
        f"\ncold start (controller process started after the objects exist, --interval "
        f"{args.interval:g})"
    )
    print(f"  all three kinds listed, watches open  {secs(cold['watching'])}")
    print(f"  first policy status written           {secs(cold['first'])}")
    print(f"  all: observedGeneration + matched     {secs(cold['matched'])}")
    print(f"  all: every compared field current     {secs(cold['current'])}")
    for name, seen, expected in cold["wrong"]:
        print(f"    {name}: status {seen}, expected {expected}")
    print(f"  controller VmRSS then                 {cold['rss']:6.0f} MiB")
    if baseline is not None:
        print(
            f"  floor: bare kopf on.event watcher (same 3 kinds, same token), every object "
            f"seen {secs(baseline['seconds']).strip()}, VmRSS {baseline['rss']:.0f} MiB, "
            f"VmHWM {baseline['hwm']:.0f} MiB"
        )
    if steady is not None:
        print(f"\nsteady state ({args.rate:g} report status changes/s for {args.seconds:g} s)")
        print(
            f"  changes written                       {steady['changes']:>6} in "
            f"{steady['elapsed']:.1f} s (median patch round trip {steady['patch_ms']:.1f} ms"
            + (f", {len(steady['failures'])} failed)" if steady["failures"] else ")")
        )
        achieved = steady["changes"] / steady["elapsed"] if steady["elapsed"] else 0.0
        print(
            f"  rate achieved                         {achieved:6.1f}/s "
            f"({args.change_workers} connections)"
        )
        window = steady["elapsed"] or 1.0
        print(
            "  CPU while changing (% of one core)    "
            + ", ".join(f"{name} {100 * sec / window:.0f}" for name, sec in steady["cpu"].items())
        )
        for failure in steady["failures"][:3]:
            print(f"    {failure[:160]}")
        print(f"  policy status patches by the ctrl     {steady['status_writes']:>6}")
        print(
            f"  status staleness while changing       p50 {steady['stale_p50']:.1f} s, "
            f"p95 {steady['stale_p95']:.1f} s, max {steady['stale_max']:.1f} s"
            + (
                f" ({steady['stale_unscored']} samples showed writes in flight interleaved: "
                "not scored)"
                if steady["stale_unscored"]
                else ""
            )
        )
        print(f"  lag after the last change             {secs(steady['lag'])}")
    hwm = max(cold["hwm"], steady["hwm"] if steady else 0.0)
    last_rss = steady["rss"] if steady else cold["rss"]
    errors = [
        line
        for line in controller.log.read_text(errors="replace").splitlines()
        if " ERROR " in line or "Traceback" in line
    ]
    lag = steady["lag"] if steady else None
    deleted = sum(deletes.values())
    achieved = steady["changes"] / steady["elapsed"] if steady and steady["elapsed"] else 0.0
    rows = [
        (
            "cold start, all policies current",
            secs(cold["current"]),
            f"<= {GOAL_COLD:g} s",
            verdict(cold["current"], GOAL_COLD),
        ),
        (
            "  floor: bare kopf on.event watcher",
            secs(baseline["seconds"]) if baseline else "skipped",
            "",
            "",
        ),
        (
            f"steady-state lag (at {achieved:.0f} changes/s)",
            secs(lag),
            f"<= {GOAL_LAG:g} s",
            verdict(lag, GOAL_LAG),
        ),
        (
            "  report changes/s achieved",
            f"{achieved:5.1f}/s",
            f">= {0.95 * args.rate:g}/s",
            "ok" if achieved >= 0.95 * args.rate else "MISSED",
        ),
        (
            "controller VmHWM (peak RSS)",
            f"{hwm:4.0f} MiB",
            f"<= {GOAL_RSS_MIB:g} MiB",
            verdict(hwm, GOAL_RSS_MIB),
        ),
        (
            "  floor: bare kopf watcher VmHWM",
            f"{baseline['hwm']:4.0f} MiB" if baseline else "skipped",
            "",
            "",
        ),
        ("controller VmRSS at the end", f"{last_rss:4.0f} MiB", "", ""),
        (
            f"reports deleted ({uptime:.0f} s up, any user)",
            str(deleted),
            "0",
            "ok" if deleted == 0 else "MISSED",
        ),
        ("controller log ERROR lines", str(len(errors)), "0", "ok" if not errors else "MISSED"),
    ]
    print(f"\n{'summary':<40} {'measured':>9}  {'goal':<12} verdict")
    for what, value, goal, ok in rows:
        print(f"  {what:<38} {value:>9}  {goal:<12} {ok}".rstrip())
    for user, count in deletes.items():
        print(f"  reports deleted by {user}: {count}")
    for line in errors[:5]:
        print(f"  {line[:160]}")
    return any(row[3] == "MISSED" for row in rows) or steady is None


if __name__ == "__main__":
    sys.exit(main())
