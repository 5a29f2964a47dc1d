"""Benchmark: the cluster agent on this host under load: RSS, CPU share, API requests.

Starts a private control plane (etcd, kube-apiserver, kube-controller-manager built by
hack/cluster/controlplane.py, in a temporary directory) with nodemem's CRDs and the
chart's ServiceAccounts, RBAC and admission policy, and creates a Node for the agent
(its Lease renewed as a kubelet would, so that the node controller leaves it Ready), a
few pods on it and one NodeMemoryPolicy selecting it: a tmpfs limit on a tmpfs mounted
here, an oom rule matching half of the background processes by cmdline, a cleanup rule
for old *.log files (some held open by background processes). Starts 1,000 `sleep`
processes (a third hold an fd to a file on the tmpfs), then the real agent as its own
process (`python -m nodemem.cli agent ...`) for --minutes, authenticated as the chart's
agent ServiceAccount with a token bound to a Pod on its Node (so RBAC and the admission
policy apply as in a cluster), and samples its /proc/PID/status VmRSS/VmHWM and
/proc/PID/stat CPU time every few seconds. Its API requests are counted from the API
server's audit log (the agent's user only). The first minute (startup) is reported apart
from the steady state. Then, in the same run with the same processes, the baseline: the
cost of one `nodemem report --json` (CPU from RUSAGE_CHILDREN, and wall time) expressed
as one report per resync, to compare with the agent's CPU share. The control plane's
own cost (VmHWM and CPU of etcd, kube-apiserver, kube-controller-manager) is printed too.

Run as root (it mounts a tmpfs): `python bench/agent_load.py [--minutes 10]
[--processes 1000] [--resync 30]`. Goals: RSS <= 80 MiB, CPU <= 1 % of a core,
<= 1 write/min in the steady state. `--profile FILE` runs the agent under cProfile.
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from nodemem.agent.report_diff import meaningful_change

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cluster import (
    AGENT_USER,
    AuditEvent,
    Cluster,
    Kube,
    NodeLeases,
    control_plane_lines,
    private_cluster,
)

NODE = "bench-node"
NODES = "v1/nodes"
PODS = "v1/pods"
POLICIES = "nodemem.dev/v1alpha1/nodememorypolicies"
REPORTS = "nodemem.dev/v1alpha1/nodememoryreports"
OOM_ADJ = 500
TMPFS_MOUNT_SIZE = "256m"
TMPFS_LIMIT = "128Mi"
TMPFS_LIMIT_BYTES = 128 << 20
SAMPLE_SECONDS = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
OLD = time.time() - 7 * 24 * 3600  # older than the cleanup rule's 1h

READ_VERBS = frozenset({"get", "list", "watch"})
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})

GOAL_RSS_MIB = 80.0
GOAL_CPU_PERCENT = 1.0
GOAL_WRITES_PER_MIN = 1.0


# ------------------------------------------------------------------------ /proc sampling


@dataclass
class Sample:
    t: float  # seconds since the agent started
    rss_kib: int
    hwm_kib: int
    cpu_ticks: int  # utime + stime + cutime + cstime
    seq: int  # the audit log's position (bytes)
    host_busy: int  # /proc/stat jiffies, all cores
    host_total: int


def status_kib(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def cpu_ticks(pid: int) -> int:
    """utime + stime (+ waited-for children) of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as file:
        after_comm = file.read().rpartition(")")[2].split()
    # after_comm[0] is field 3 (state); utime..cstime are fields 14..17.
    return sum(int(value) for value in after_comm[11:15])


def host_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as file:
        values = [int(v) for v in file.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


# ------------------------------------------------------------------------ the setup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def policy(point: Path, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "bench"},
        "spec": {
            "nodeSelector": {"matchLabels": {"pool": "bench"}},
            "tmpfs": [{"path": str(point), "size": TMPFS_LIMIT}],
            "oom": [
                {
                    "name": "batch",
                    "match": {"cmdline": f"^nodemem-bench-batch-{token} "},
                    "oomScoreAdj": OOM_ADJ,
                }
            ],
            "cleanup": [
                {
                    "name": "old-logs",
                    "paths": [f"{point}/*.log"],
                    "schedule": "*/5 * * * *",
                    "olderThan": "1h",
                }
            ],
            "shmem": {"unaccountedThreshold": "2Gi"},
        },
    }


def fill_tmpfs(point: Path) -> None:
    """A current data file, ten old logs that processes hold open, twenty old logs."""
    (point / "data.bin").write_bytes(b"d" * 32 * MiB)
    for index in range(10):
        held = point / f"held-{index}.log"
        held.write_bytes(b"h" * MiB)
        os.utime(held, (OLD, OLD))
    for index in range(20):
        old = point / f"old-{index}.log"
        old.write_bytes(b"o" * 256 * 1024)
        os.utime(old, (OLD, OLD))


def seed_api(cluster: Cluster, leases: NodeLeases, point: Path, token: str, pods: int) -> None:
    """The Node (and its kubelet's Lease, renewed by ``leases`` from now on), the pods on
    it (Running, as their kubelet would say), the policy."""
    kube = cluster.admin
    node = kube.create_object(
        NODES,
        {
            "metadata": {
                "name": NODE,
                "labels": {"pool": "bench", "kubernetes.io/hostname": NODE},
            },
            "status": {"capacity": {"memory": "24Gi", "cpu": "2"}},
        },
    )
    leases.add(NODE, node["metadata"]["uid"])
    # The ServiceAccount admission refuses pods until the controller manager made it.
    cluster.wait_for_service_account("default", "default")
    for index in range(pods):
        kube.create_object(
            PODS,
            {
                "metadata": {
                    "name": f"app-{index}",
                    "labels": {"app": "bench", "tier": "batch" if index % 2 else "web"},
                },
                "spec": {
                    "nodeName": NODE,
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "app", "image": "registry.example/app:1"}],
                },
            },
            namespace="default",
        )
        kube.patch_object(
            PODS,
            f"app-{index}",
            {"status": {"phase": "Running"}},
            subresource="status",
            namespace="default",
        )
    kube.create_object(POLICIES, policy(point, token))


def start_background(count: int, point: Path, token: str, seconds: int) -> list[int]:
    """`sleep` processes via posix_spawn: even ones match the oom rule (by argv[0]),
    every third holds fd 3 open on one of the held-N.log files."""
    sleep = shutil.which("sleep") or "/bin/sleep"
    env = {"PATH": "/usr/bin:/bin"}
    pids: list[int] = []
    for index in range(count):
        kind = "batch" if index % 2 == 0 else "idle"
        argv = [f"nodemem-bench-{kind}-{token}", str(seconds)]
        actions = []
        if index % 3 == 0:
            held = str(point / f"held-{index % 10}.log")
            actions = [(os.POSIX_SPAWN_OPEN, 3, held, os.O_RDONLY, 0)]
        pids.append(os.posix_spawn(sleep, argv, env, file_actions=actions))
    return pids


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)


def adj_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    except OSError:
        return None


@contextmanager
def mounted_tmpfs(point: Path) -> Iterator[Path]:
    point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MOUNT_SIZE}", "nodemem-bench", str(point)],
        check=True,
    )
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)


def wait_for(predicate: Callable[[], bool], timeout: float, agent: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(0.2)
    return False


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


# ------------------------------------------------------------------------ measuring


def sample(pid: int, cluster: Cluster, started: float) -> Sample:
    rss, hwm = status_kib(pid)
    busy, total = host_jiffies()
    return Sample(
        t=time.monotonic() - started,
        rss_kib=rss,
        hwm_kib=hwm,
        cpu_ticks=cpu_ticks(pid),
        seq=cluster.audit.mark(),
        host_busy=busy,
        host_total=total,
    )


def at(samples: list[Sample], t: float) -> Sample:
    """The first sample at or after t (the last one if none)."""
    return next((s for s in samples if s.t >= t), samples[-1])


@dataclass
class RequestCounts:
    total: int = 0
    reads: int = 0
    watches: int = 0
    writes: int = 0
    status_writes: int = 0
    events: int = 0
    refused: int = 0  # answered 4xx or 5xx

    @classmethod
    def of(cls, records: list[AuditEvent]) -> RequestCounts:
        counts = cls(total=len(records))
        for record in records:
            counts.refused += record.code is not None and record.code >= 400
            if record.verb in READ_VERBS:
                counts.reads += 1
                counts.watches += record.verb == "watch"
            elif record.verb in WRITE_VERBS:
                counts.writes += 1
                counts.status_writes += record.subresource == "status"
                counts.events += record.plural == "events"
        return counts


def requests_between(cluster: Cluster, first: int, last: int) -> list[AuditEvent]:
    """The agent's requests between two audit log positions, each counted once, when sent
    (a watch when its stream started)."""
    return cluster.audit.sent(since=first, until=last, user=AGENT_USER)


def changed_keys(old: Any, new: Any, path: str = "") -> list[str]:
    """Where a report status changed in a way the agent counts as meaningful."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return [path]
    found: list[str] = []
    for key in sorted(old.keys() | new.keys()):
        if meaningful_change(old.get(key), new.get(key), key):
            found += changed_keys(old.get(key), new.get(key), f"{path}.{key}".lstrip("."))
    return found


class StatusWatcher:
    """Each new version of the report's status seen by the sampler, and what changed."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.version: str | None = None
        self.status: dict[str, Any] | None = None
        self.changes: list[tuple[float, list[str]]] = []

    def poll(self, t: float) -> None:
        obj = self.kube.get_object(REPORTS, NODE)
        if obj is None or obj["metadata"].get("resourceVersion") == self.version:
            return
        self.version = obj["metadata"].get("resourceVersion")
        status = obj.get("status") or {}
        if self.status is None:
            keys = ["(first status)"] if status else ["(created)"]
        else:
            keys = changed_keys(self.status, status) or ["(nothing meaningful: heartbeat)"]
        self.changes.append((t, keys))
        self.status = status


@dataclass
class ReportCost:
    cpu: float  # seconds, median of the runs that succeeded
    wall: float
    runs: int
    failures: list[str]  # the end of stderr of each run that failed


def child_cpu(argv: list[str], runs: int) -> ReportCost:
    """Median CPU (user + sys, from RUSAGE_CHILDREN deltas) and wall time of a command."""
    cpus, walls, failures = [], [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            failures.append(done.stderr.decode(errors="replace")[-2000:])
            continue
        walls.append(wall)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if not cpus:
        raise RuntimeError(f"{' '.join(argv)} failed every time:\n{failures[-1]}")
    return ReportCost(statistics.median(cpus), statistics.median(walls), len(cpus), failures)


# ------------------------------------------------------------------------ the run


def verdict(met: bool) -> str:
    return "met" if met else "NOT MET"


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))


def run(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> int:
    token = str(secrets.randbelow(10**6) + 10**6)  # names this run's processes
    duration = int(args.minutes * 60)
    warmup = args.warmup

    point = workdir / "mnt"
    stack.enter_context(mounted_tmpfs(point))
    fill_tmpfs(point)

    cluster = stack.enter_context(private_cluster())
    kube = cluster.admin
    leases = NodeLeases(kube, interval=10.0).start()  # a kubelet's interval
    stack.callback(leases.stop)
    seed_api(cluster, leases, point, token, args.pods)
    # The agent's identity as in the DaemonSet: a token bound to a Pod on its Node.
    agent_token = cluster.agent_token(NODE, expiration=max(3600, duration + 1800))
    kubeconfig = cluster.write_kubeconfig(workdir / "agent.kubeconfig", agent_token)

    background: list[int] = []
    stack.callback(kill_all, background)
    spawn_started = time.perf_counter()
    background.extend(start_background(args.processes, point, token, duration + 3600))
    matched = background[::2]
    print(
        f"{len(background)} background processes in "
        f"{time.perf_counter() - spawn_started:.2f} s ({len(matched)} match the oom rule, "
        f"{len(background[::3])} hold a tmpfs file open); {args.pods} pods on {NODE}"
    )

    log_path = Path(args.log) if args.log else workdir / "agent.log"
    profile = ["-m", "cProfile", "-o", str(Path(args.profile).resolve())] if args.profile else []
    argv = [
        sys.executable,
        *profile,
        "-m",
        "nodemem.cli",
        "agent",
        "--kubeconfig",
        str(kubeconfig),
        "--node-name",
        NODE,
        "--state-dir",
        str(workdir / "state"),
        "--metrics-port",
        str(free_port()),
        "--resync",
        str(args.resync),
        "--heartbeat",
        str(args.heartbeat),
    ]
    log_file = stack.enter_context(log_path.open("wb"))
    first_seq = cluster.audit.mark()
    agent = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    started = time.monotonic()
    started_wall = time.time()
    stack.callback(stop_process, agent)
    print(f"agent pid {agent.pid}: {' '.join(argv[1:])}")

    def enforcing() -> bool:
        obj = kube.get_object(REPORTS, NODE) or {}
        policies = (obj.get("status") or {}).get("policies")
        st = os.statvfs(point)
        return bool(policies) and st.f_blocks * st.f_frsize == TMPFS_LIMIT_BYTES

    samples = [sample(agent.pid, cluster, started)]
    statuses = StatusWatcher(kube)
    if not wait_for(enforcing, 120, agent):
        print("the agent did not enforce the policy within 120 s; its log:", file=sys.stderr)
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        return 1
    adjusted = sum(adj_of(pid) == OOM_ADJ for pid in matched)
    print(
        f"agent enforcing after {time.monotonic() - started:.1f} s: tmpfs at {TMPFS_LIMIT}, "
        f"{adjusted}/{len(matched)} matching processes at oomScoreAdj {OOM_ADJ}"
    )

    end = started + duration
    next_sample = started + SAMPLE_SECONDS
    next_progress = started + 60
    while True:
        now = time.monotonic()
        if agent.poll() is not None:
            print(f"the agent exited ({agent.returncode}) after {now - started:.0f} s; log tail:")
            print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
            return 1
        if now >= next_sample:
            samples.append(sample(agent.pid, cluster, started))
            statuses.poll(samples[-1].t)
            next_sample += SAMPLE_SECONDS
        if now >= next_progress:
            last = samples[-1]
            print(
                f"  {last.t / 60:4.1f} min: RSS {last.rss_kib / 1024:.1f} MiB, "
                f"CPU {last.cpu_ticks / CLK_TCK:.2f} s, "
                f"{len(requests_between(cluster, first_seq, last.seq))} requests",
                flush=True,
            )
            next_progress += 60
        if now >= end:
            break
        time.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
    final = samples[-1]

    adjusted_end = sum(adj_of(pid) == OOM_ADJ for pid in matched)
    exit_code = stop_process(agent)
    log_text = log_path.read_text(errors="replace")
    log_problems = [
        line
        for line in log_text.splitlines()
        if " WARNING " in line or " ERROR " in line or "Traceback" in line
    ]
    final_status = (kube.get_object(REPORTS, NODE) or {}).get("status") or {}
    node_now = kube.get_object(NODES, NODE) or {}
    unreachable = [
        t["effect"]
        for t in (node_now.get("spec") or {}).get("taints") or []
        if t["key"] == "node.kubernetes.io/unreachable"
    ]
    plane_memory, plane_cpu = cluster.memory(), cluster.cpu_seconds()
    sent = requests_between(cluster, first_seq, final.seq)

    # One `nodemem report` on the same host, the agent stopped (so that neither disturbs
    # the other, and the agent, a child too, is already reaped from RUSAGE_CHILDREN).
    report = child_cpu([sys.executable, "-m", "nodemem.cli", "report", "--json"], args.report_runs)
    imports = child_cpu([sys.executable, "-c", "import nodemem.cli"], args.report_runs)

    # ---- figures
    steady_from = at(samples, warmup)
    window = final.t - steady_from.t
    if window <= 0:
        print(f"no steady state: run longer than the {warmup:.0f} s warm-up", file=sys.stderr)
        return 1
    steady = [s for s in samples if s.t >= steady_from.t]
    rss_steady = statistics.median(s.rss_kib for s in steady) / 1024
    rss_peak = final.hwm_kib / 1024
    startup_cpu = steady_from.cpu_ticks / CLK_TCK
    steady_cpu = (final.cpu_ticks - steady_from.cpu_ticks) / CLK_TCK
    cpu_share = 100 * steady_cpu / window
    report_share = 100 * report.cpu / args.resync
    host_busy = (
        100
        * (os.cpu_count() or 1)
        * (final.host_busy - steady_from.host_busy)
        / max(1, final.host_total - steady_from.host_total)
    )
    first = RequestCounts.of(requests_between(cluster, first_seq, steady_from.seq))
    later = RequestCounts.of(requests_between(cluster, steady_from.seq, final.seq))
    per_min = 60 / window

    print()
    print(
        f"agent: {duration / 60:.1f} min at {args.resync:g} s resync, heartbeat "
        f"{args.heartbeat:g} s, {args.processes} background processes, exit code {exit_code}; "
        f"{final.cpu_ticks / CLK_TCK:.2f} s CPU in all; steady state = after the first "
        f"{steady_from.t:.0f} s ({window / 60:.1f} min)"
    )
    rows = [
        ("measure", "value", "goal", "verdict"),
        ("agent RSS, steady (median)", f"{rss_steady:.1f} MiB", "", ""),
        (
            "agent RSS, peak (VmHWM)",
            f"{rss_peak:.1f} MiB",
            f"<= {GOAL_RSS_MIB:g} MiB",
            verdict(rss_peak <= GOAL_RSS_MIB),
        ),
        (
            "agent CPU, steady",
            f"{cpu_share:.2f} % of a core ({steady_cpu:.2f} s)",
            f"<= {GOAL_CPU_PERCENT:g} %",
            verdict(cpu_share <= GOAL_CPU_PERCENT),
        ),
        ("agent CPU, first minute (startup)", f"{startup_cpu:.2f} s", "", ""),
        (
            "one `nodemem report` per resync",
            f"{report_share:.2f} % of a core ({report.cpu:.2f} s CPU, {report.wall:.2f} s wall"
            + (f", {len(report.failures)} failed)" if report.failures else ")"),
            "",
            "",
        ),
        ("  of which interpreter + imports", f"{imports.cpu:.2f} s CPU", "", ""),
        (
            "agent vs report per resync",
            f"{cpu_share / report_share:.2f}x" if report_share else "-",
            "< 1x",
            verdict(cpu_share < report_share),
        ),
        ("API requests/min, steady", f"{later.total * per_min:.2f}", "", ""),
        (
            "  reads (get/list/watch)",
            f"{later.reads * per_min:.2f} ({later.watches * per_min:.2f} watches)",
            "",
            "",
        ),
        (
            "  writes",
            f"{later.writes * per_min:.2f}",
            f"<= {GOAL_WRITES_PER_MIN:g}",
            verdict(later.writes * per_min <= GOAL_WRITES_PER_MIN),
        ),
        ("  status writes", f"{later.status_writes * per_min:.2f}", "", ""),
        ("  events", f"{later.events * per_min:.2f}", "", ""),
        (
            "API requests, first minute",
            f"{first.total} ({first.reads} reads, {first.writes} writes, "
            f"{first.status_writes} status)",
            "",
            "",
        ),
    ]
    print_table(rows)

    print()
    print("requests per minute (reads / writes / status writes):")
    cells = []
    for minute in range(max(1, int(-(-(final.t - SAMPLE_SECONDS) // 60)))):
        lo, hi = at(samples, 60 * minute), at(samples, 60 * (minute + 1))
        counts = RequestCounts.of(requests_between(cluster, lo.seq, hi.seq))
        cells.append(f"{minute}: {counts.reads}/{counts.writes}/{counts.status_writes}")
    print("  " + ", ".join(cells))
    writes = [r for r in sent if r.verb in WRITE_VERBS]
    print(f"writes (t in s since the agent started: verb resource[/subresource]), {len(writes)}:")
    print(
        "  "
        + ", ".join(
            f"{r.received - started_wall:.0f}: {r.verb} {r.plural}"
            + (f"/{r.subresource}" if r.subresource else "")
            for r in writes[:40]
        )
    )
    print("report status versions seen (t in s: what changed meaningfully):")
    for t, keys in statuses.changes:
        shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
        print(f"  {t:.0f}: {shown}")
    print(
        f"oom rule: {adjusted_end}/{len(matched)} matching processes at {OOM_ADJ} at the end; "
        f"report: tmpfs {[t.get('state') for t in final_status.get('tmpfs', [])]}, "
        f"cleanup files removed {[c.get('filesRemoved') for c in final_status.get('cleanup', [])]}"
    )
    print(
        f"host CPU busy in the steady state: {host_busy:.1f} % of one core (all processes; "
        f"other load on the host disturbs the agent's figures)"
    )
    print(f"agent log: {len(log_text.splitlines())} lines, {len(log_problems)} warnings/errors")
    for line in log_problems[:5]:
        print(f"  {line[:200]}")
    for failure in report.failures:
        print(f"a `nodemem report` failed:\n{failure}", file=sys.stderr)
    if args.profile:
        print(f"profile: {args.profile}")
    refused = [r for r in sent if r.code is not None and r.code >= 400]
    print(
        f"agent requests refused (4xx/5xx): {len(refused)}"
        + "".join(
            f"\n  {r.received - started_wall:.0f}: {r.verb} {r.resource}"
            + (f"/{r.subresource}" if r.subresource else "")
            + f" {r.name or ''} -> {r.code}"
            for r in refused[:10]
        )
    )
    print(
        f"node {NODE}: "
        + (f"tainted unreachable ({', '.join(unreachable)})" if unreachable else "not tainted")
        + f"; Lease renewed {leases.renewals} times ({len(leases.failures)} failed)"
    )
    for line in control_plane_lines(plane_memory, plane_cpu):
        print(line)
    return 1 if refused or unreachable else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the agent runs")
    parser.add_argument("--processes", type=int, default=1000, help="background processes")
    parser.add_argument("--resync", type=float, default=30.0, help="agent resync (s)")
    parser.add_argument("--heartbeat", type=float, default=300.0, help="agent heartbeat (s)")
    parser.add_argument("--warmup", type=float, default=60.0, help="startup, not steady (s)")
    parser.add_argument("--pods", type=int, default=20, help="pods on the agent's node")
    parser.add_argument("--report-runs", type=int, default=5, help="`nodemem report` runs")
    parser.add_argument("--profile", metavar="FILE", help="run the agent under cProfile")
    parser.add_argument("--log", metavar="FILE", help="keep the agent's log here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/agent_load.py needs root: it mounts a tmpfs", file=sys.stderr)
        return 2

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    workdir = Path(tempfile.mkdtemp(prefix="nodemem-bench-agent-"))
    started = time.monotonic()
    try:
        # Undone in reverse: the agent stopped, the processes killed, the Lease renewals
        # and the control plane stopped, the tmpfs unmounted; every step runs even if one
        # before it fails.
        with ExitStack() as stack:
            return run(args, workdir, stack)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
