"""Benchmark: the controller at cluster scale, against the test-side API emulator.

Creates N Nodes (default 5,000) and their NodeMemoryReports (realistic statuses, each
listing every policy that selects its node) and 20 NodeMemoryPolicies with varied
nodeSelectors (5 of them at generation 2, some nodes still at generation 1, some
refusals, one policy selecting nothing). The emulator (``tests/kube/emulator.py``)
is served from this process; the controller runs in a separate process
(``python -m nodemem.cli controller``) so that its RSS is its own. Measures:

- cold start: controller started after the objects exist, until every policy's
  status equals the one computed here, independently, from the labels and reports
  (observedGeneration, node counts, unaccounted Shmem, nodes over the threshold);
- steady state: R report status changes per second (default 100) for S seconds, each
  changing a roll-up result (a tmpfs item flipped Applied <-> Refused, or a new
  unaccountedBytes); lag from the last change until every policy status reflects it,
  and how stale the statuses got during the run;
- the controller's RSS (VmRSS, VmHWM from /proc/PID/status);
- the floor: a bare kopf ``on.event`` watcher on the same three kinds (no roll-up) in
  its own process, cold-started against the same objects.

Goals (the issue): cold start <= 30 s, lag <= 10 s, RSS <= 300 MiB; no report deleted.
``--profile`` runs the controller under cProfile and prints its hottest functions (the
figures are then slower); ``--controller-script FILE`` runs FILE instead of
``-m nodemem.cli`` (same arguments), to measure a candidate fix without editing the package.
Usage: ``python bench/controller_scale.py [--nodes 5000] [--policies 20] [--seconds 30]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "kube"))

from emulator import EmulatorThread, KubeEmulator, make_emulator, write_kubeconfig  # noqa: E402

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


def node_object(node: NodeState) -> dict[str, Any]:
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
                "node.alpha.kubernetes.io/ttl": "0",
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


def populate(kube: KubeEmulator, model: Model) -> list[tuple[str, int, float]]:
    """Create everything through the emulator's in-process API (validation and events as
    over HTTP). Returns (what, how many, seconds)."""
    timings: list[tuple[str, int, float]] = []

    def timed(what: str, items: list[Any], create: Callable[[Any], None]) -> None:
        start = time.perf_counter()
        for item in items:
            create(item)
        timings.append((what, len(items), time.perf_counter() - start))

    def create_node(node: NodeState) -> None:
        node.uid = kube.create_object(NODES, node_object(node))["metadata"]["uid"]

    def create_report(node: NodeState) -> None:
        owner = {"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid}
        body = {
            "apiVersion": "nodemem.dev/v1alpha1",
            "kind": "NodeMemoryReport",
            "metadata": {"name": node.name, "ownerReferences": [owner]},
        }
        kube.create_object(REPORTS, body)

    def write_status(node: NodeState) -> None:
        status = report_status(node)
        kube.patch_object(REPORTS, node.name, {"status": status}, subresource="status")

    def create_policy(policy: PolicyInfo) -> None:
        kube.create_object(POLICIES, policy_object(policy))
        if policy.generation > 1:  # a spec change: generation 2
            kube.patch_object(POLICIES, policy.name, {"spec": {"priority": 10}})
            got = kube.get_object(POLICIES, policy.name)
            assert got is not None and got["metadata"]["generation"] == policy.generation

    timed("nodes", model.nodes, create_node)
    timed("reports", model.nodes, create_report)
    timed("report statuses", [n for n in model.nodes if n.has_status], write_status)
    timed("policies", model.policies, create_policy)
    return timings


# ------------------------------------------------------------------------------------------
# Processes: the controller, the bare watcher, their memory
# ------------------------------------------------------------------------------------------


def proc_memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


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
        result["rss"], result["hwm"] = proc_memory(process.pid)
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


# ------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------


def observe_all(kube: KubeEmulator, model: Model) -> list[Outcome | None]:
    return [observed(kube.get_object(POLICIES, p.name)) for p in model.policies]


def cold_start(
    kube: KubeEmulator, model: Model, controller: Controller, timeout: float
) -> dict[str, Any]:
    expected = [model.outcome(p) for p in range(len(model.policies))]
    t0 = controller.started
    marks: dict[str, float | None] = {"watching": None, "first": None, "matched": None}
    peak = 0.0
    current: float | None = None
    last: list[Outcome | None] = []
    while time.monotonic() - t0 < timeout:
        if controller.process.poll() is not None:
            raise SystemExit(f"the controller exited; see {controller.log}")
        now = time.monotonic() - t0
        peak = max(peak, proc_memory(controller.process.pid)[0])
        if marks["watching"] is None and all(
            kube.watch_count(r) for r in (POLICIES, NODES, REPORTS)
        ):
            marks["watching"] = now
        last = observe_all(kube, model)
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
    rss, hwm = proc_memory(controller.process.pid)
    wrong = [
        (p.name, o, e)
        for p, o, e in zip(model.policies, last, expected, strict=True)
        if o != e and current is None
    ]
    return {**marks, "current": current, "rss": rss, "hwm": hwm, "peak": peak, "wrong": wrong}


class Staleness:
    """Per-policy history of expected outcomes, to tell how old what the status shows is."""

    def __init__(self, model: Model, start: float) -> None:
        self.times = [[start] for _ in model.policies]
        self.values = [[model.outcome(p)] for p in range(len(model.policies))]
        self.lock = threading.Lock()
        self.samples: list[float] = []

    def record(self, p: int, when: float, value: Outcome) -> None:
        with self.lock:
            self.times[p].append(when)
            self.values[p].append(value)

    def sample(self, p: int, seen: Outcome | None, now: float) -> float:
        """0 when the status shows the newest expected value; else the time since the first
        change it does not show (optimistic: the newest earlier match is assumed)."""
        with self.lock:
            values, times = self.values[p], self.times[p]
            if seen == values[-1]:
                age = 0.0
            else:
                j = next((k for k in range(len(values) - 1, -1, -1) if values[k] == seen), -1)
                age = now - times[j + 1] if j + 1 < len(times) else 0.0
        self.samples.append(age)
        return age


def steady_state(
    kube: KubeEmulator, model: Model, controller: Controller, args: argparse.Namespace
) -> dict[str, Any]:
    rng = random.Random(args.seed + 1)
    candidates = [n for n in model.nodes if n.has_status and n.policies]
    mark = kube.mark()
    writes_before = kube.count(verb="patch", resource=POLICIES)
    stop = threading.Event()
    changes: list[float] = []
    patch_seconds: list[float] = []
    staleness = Staleness(model, time.monotonic())
    rss_peak = [0.0]

    def one_change(k: int) -> None:
        node = rng.choice(candidates)
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
        begin = time.perf_counter()
        status = report_status(node)
        kube.patch_object(REPORTS, node.name, {"status": status}, subresource="status")
        when = time.monotonic()
        patch_seconds.append(time.perf_counter() - begin)
        for p in moved:
            staleness.record(p, when, model.outcome(p))
        changes.append(when)

    def poll() -> None:
        while not stop.is_set():
            now = time.monotonic()
            for p, seen in enumerate(observe_all(kube, model)):
                staleness.sample(p, seen, now)
            rss_peak[0] = max(rss_peak[0], proc_memory(controller.process.pid)[0])
            stop.wait(0.2)

    poller = threading.Thread(target=poll, name="poller", daemon=True)
    poller.start()
    start = time.monotonic()
    total = int(args.rate * args.seconds)
    for k in range(total):
        delay = start + k / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        one_change(k)
    elapsed = changes[-1] - start if changes else 0.0
    stop.set()
    poller.join()
    during = list(staleness.samples)
    last_change = changes[-1] if changes else time.monotonic()
    expected = [model.outcome(p) for p in range(len(model.policies))]
    lag: float | None = None
    while time.monotonic() - last_change < args.timeout:
        if observe_all(kube, model) == expected:
            lag = time.monotonic() - last_change
            break
        time.sleep(0.02)
    rss, hwm = proc_memory(controller.process.pid)
    return {
        "changes": len(changes),
        "elapsed": elapsed,
        "patch_ms": statistics.median(patch_seconds) * 1000 if patch_seconds else 0.0,
        "lag": lag,
        "stale_max": max(during, default=0.0),
        "stale_p50": statistics.median(during) if during else 0.0,
        "stale_p95": _percentile(during, 0.95),
        "status_writes": kube.count(verb="patch", resource=POLICIES) - writes_before,
        "report_deletes": kube.count(since=mark, verb="delete", resource=REPORTS),
        "rss": rss,
        "hwm": hwm,
        "peak": max(rss_peak[0], rss),
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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
            for child in path.iterdir():
                child.unlink()
            path.rmdir()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.watcher:
        kubeconfig, nodes, reports, policies = args.watcher
        watcher_main(kubeconfig, int(nodes), int(reports), int(policies))
        return 0
    began = time.monotonic()
    model = build_model(args.nodes, args.policies, args.seed)
    kube = make_emulator()
    server = EmulatorThread(kube).start()
    failed = False
    with workdir(args.keep or args.profile) as work:
        kubeconfig = write_kubeconfig(work / "kubeconfig", server.url)
        try:
            timings = populate(kube, model)
            print(f"controller_scale: {args.nodes} nodes and reports, {args.policies} policies")
            print("\nobjects created (in-process API: validation, resourceVersions, events)")
            for what, count, seconds in timings:
                print(f"  {what:<17} {count:>6}  {seconds:6.1f} s  {count / seconds:8.0f}/s")
            statuses = sum(n.has_status for n in model.nodes)
            print(
                f"  per policy: matched {min(len(p.nodes) for p in model.policies)}"
                f"..{max(len(p.nodes) for p in model.policies)} nodes; "
                f"{args.nodes - statuses} reports without status"
            )
            baseline: dict[str, Any] | None = None
            if not args.no_baseline:
                baseline = run_baseline(kubeconfig, model, args.timeout)
            controller = start_controller(kubeconfig, work, args)
            try:
                cold = cold_start(kube, model, controller, args.timeout)
                steady = steady_state(kube, model, controller, args) if cold["current"] else None
                deletes = kube.count(verb="delete", resource=REPORTS)
                uptime = time.monotonic() - controller.started
            finally:
                stop_process(controller.process)
            failed = report(
                args,
                cold=cold,
                steady=steady,
                baseline=baseline,
                deletes=deletes,
                uptime=uptime,
                controller=controller,
            )
            if controller.profile is not None:
                print_profile(controller.profile)
        finally:
            server.stop()
    print(f"\nwhole run: {time.monotonic() - began:.0f} s")
    return 1 if failed else 0


def report(
    args: argparse.Namespace,
    *,
    cold: dict[str, Any],
    steady: dict[str, Any] | None,
    baseline: dict[str, Any] | None,
    deletes: int,
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
            f"  floor: bare kopf on.event watcher (same 3 kinds), every object seen "
            f"{secs(baseline['seconds']).strip()}, VmRSS {baseline['rss']:.0f} MiB, "
            f"VmHWM {baseline['hwm']:.0f} MiB"
        )
    if steady is not None:
        print(f"\nsteady state ({args.rate:g} report status changes/s for {args.seconds:g} s)")
        print(
            f"  changes written                       {steady['changes']:>6} in "
            f"{steady['elapsed']:.1f} s (median in-process patch {steady['patch_ms']:.1f} ms)"
        )
        print(f"  policy status patches by the ctrl     {steady['status_writes']:>6}")
        print(
            f"  status staleness while changing       p50 {steady['stale_p50']:.1f} s, "
            f"p95 {steady['stale_p95']:.1f} s, max {steady['stale_max']:.1f} s"
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
            "steady-state lag after last change",
            secs(lag),
            f"<= {GOAL_LAG:g} s",
            verdict(lag, GOAL_LAG),
        ),
        (
            "controller VmHWM (peak RSS)",
            f"{hwm:4.0f} MiB",
            f"<= {GOAL_RSS_MIB:g} MiB",
            verdict(hwm, GOAL_RSS_MIB),
        ),
        ("controller VmRSS at the end", f"{last_rss:4.0f} MiB", "", ""),
        (
            f"reports deleted ({uptime:.0f} s up, grace 30 s)",
            str(deletes),
            "0",
            "ok" if deletes == 0 else "MISSED",
        ),
        ("controller log ERROR lines", str(len(errors)), "0", "ok" if not errors else "MISSED"),
    ]
    print(f"\n{'summary':<40} {'measured':>9}  {'goal':<12} verdict")
    for what, value, goal, ok in rows:
        print(f"  {what:<38} {value:>9}  {goal:<12} {ok}".rstrip())
    for line in errors[:5]:
        print(f"  {line[:160]}")
    return any(row[3] == "MISSED" for row in rows) or steady is None


if __name__ == "__main__":
    sys.exit(main())
