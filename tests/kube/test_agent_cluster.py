"""The node agent against the real control plane, enforcing on this real host.

The agent authenticates as the chart's agent ServiceAccount with a token bound to a Pod
on its Node (the ValidatingAdmissionPolicy lets it write only that Node's report), never
as the admin. Policies come from the API; the agent limits a tmpfs the test mounted,
sets a test process's oom_score_adj, runs a due cleanup, and its NodeMemoryReport says
so. The server's audit log shows that it never writes to policies, keeps enforcing while
kube-apiserver is stopped (and after a restart with it stopped), posts no flood of
Events across an outage, and writes no status between heartbeats when nothing changes.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from restclient import ApiError, AuditLog, Kube, wait_until

from conftest import AGENT_USER, POLICIES, REPORTS
from nodemem.agent.main import ClusterAgent, ClusterAgentOptions
from nodemem.host.oom_adj import read_oom_score_adj
from nodemem.host.paths import HostPaths
from nodemem.kube import load_client_config
from samples import FakeWallClock

pytestmark = pytest.mark.privileged

NODES = "v1/nodes"
EVENTS = "v1/events"
MiB = 1 << 20
TIMEOUT = 30.0  # a real server and several agent threads on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def adj(pid: int) -> int:
    return read_oom_score_adj(HostPaths(), pid)  # one read(2): see its docstring


def size_of(point: Path) -> int:
    st = os.statvfs(point)
    return st.f_blocks * st.f_frsize


def policy(point: Path, token: str, *, pool: str = "web", oom_adj: int = 600) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "agent-test"},
        "spec": {
            "nodeSelector": {"matchLabels": {"pool": pool}},
            "tmpfs": [{"path": str(point), "size": "16Mi"}],
            "cleanup": [
                {
                    "name": "old-logs",
                    "paths": [f"{point}/*.log"],
                    "schedule": "0 * * * *",
                    "olderThan": "1h",
                }
            ],
            "oom": [{"name": "batch", "match": {"cmdline": token}, "oomScoreAdj": oom_adj}],
        },
    }


@dataclass
class RunningAgent:
    node: str
    cluster_agent: ClusterAgent
    thread: threading.Thread
    metrics_port: int
    clock: FakeWallClock
    kubeconfig: Path  # the agent's own credentials (its pod-bound token)

    @property
    def stop(self) -> threading.Event:
        return self.cluster_agent.stop

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), f"agent {self.node} did not stop"


@pytest.fixture
def agent_kubeconfig(
    agent_token: Callable[..., str], kubeconfig_for_token: Callable[[str], Path]
) -> Callable[..., Path]:
    """agent_kubeconfig(node, **labels): a kubeconfig with the agent's token for `node`
    (a Pod of the agent's ServiceAccount bound to it; the Node is created when missing)."""

    def issue(node: str = "node-a", **labels: str) -> Path:
        return kubeconfig_for_token(agent_token(node, **(labels or {"pool": "web"})))

    return issue


@pytest.fixture
def start_agent(agent_kubeconfig: Callable[..., Path], tmp_path: Path) -> Iterator[Any]:
    agents: list[RunningAgent] = []

    def start(
        node: str = "node-a", *, kubeconfig: Path | None = None, **overrides: Any
    ) -> RunningAgent:
        """Start a ClusterAgent for `node`; `kubeconfig` reuses credentials issued before
        (the API may be down when the agent starts)."""
        config_file = kubeconfig or agent_kubeconfig(node)
        options = ClusterAgentOptions(
            node_name=node,
            state_dir=tmp_path / f"state-{node}",
            metrics_port=free_port(),
            metrics_host="127.0.0.1",
            resync_seconds=0.3,
            heartbeat_seconds=3600,
            poll_seconds=0.05,
            wall_clock=FakeWallClock(),
        )
        for key, value in overrides.items():
            setattr(options, key, value)
        cluster_agent = ClusterAgent(options, load_client_config(str(config_file)))
        thread = threading.Thread(target=cluster_agent.run, daemon=True)
        thread.start()
        clock = options.wall_clock
        assert isinstance(clock, FakeWallClock)
        agent = RunningAgent(
            node, cluster_agent, thread, options.metrics_port or 0, clock, config_file
        )
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.halt()


def spawn(processes: list[subprocess.Popen[bytes]], token: str) -> int:
    processes.append(subprocess.Popen(["sleep", f"{token}.{len(processes) + 1}"]))
    return processes[-1].pid


def report(kube: Kube, node: str = "node-a") -> dict[str, Any]:
    obj = kube.get_object(REPORTS, node)
    return (obj or {}).get("status") or {}


def token_() -> str:
    return str(secrets.randbelow(10**6) + 10**6)


def agent_policy_reads(audit: AuditLog, since: int) -> list[Any]:
    """The agent's reads of policies (its lists and its watch): proof that the audit
    filter by AGENT_USER sees the agent at all, so that "no writes" can fail."""
    return audit.requests(since=since, user=AGENT_USER, resource=POLICIES, verb=("list", "watch"))


def test_policy_enforced_reported_updated_and_never_written(
    kube, audit, mount_tmpfs, start_agent, processes
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    kube.create_object(POLICIES, policy(point, token))
    pid = spawn(processes, token)
    start = audit.mark()
    agent = start_agent()

    # Enforced: the tmpfs limit and the running process's adj.
    wait_until(lambda: size_of(point) == 16 * MiB, message="tmpfs limited", timeout=TIMEOUT)
    wait_until(lambda: adj(pid) == 600, message="adj set", timeout=TIMEOUT)
    # A process started now gets its adj at exec.
    late = spawn(processes, token)
    wait_until(lambda: adj(late) == 600, message="adj at exec", timeout=TIMEOUT)

    # The report: created, owned by the Node, listing the policy and every item's state.
    wait_until(
        lambda: report(kube).get("policies") == [{"name": "agent-test", "generation": 1}],
        message="report lists the policy",
        timeout=TIMEOUT,
    )
    # Owned by the Node once the agent's Node watch has answered, which may come after
    # its first write (report_writer.py).
    node_uid = kube.get_object(NODES, "node-a")["metadata"]["uid"]
    wait_until(
        lambda: (
            [
                o["uid"]
                for o in kube.get_object(REPORTS, "node-a")["metadata"].get("ownerReferences", [])
            ]
            == [node_uid]
        ),
        message="the report owned by the Node",
        timeout=TIMEOUT,
    )
    status = report(kube)
    # Applied by the first resync, Unchanged from the next one on (a rewrite ~0.3 s later).
    [(path, state)] = [(t["path"], t["state"]) for t in status["tmpfs"]]
    assert (path, state) in {(str(point), "Applied"), (str(point), "Unchanged")}
    assert size_of(point) == 16 * MiB
    assert status["oom"]["rules"][0]["name"] == "batch"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Applied"] == "True"
    # Written by the agent's ServiceAccount, never by the admin.
    created = audit.requests(since=start, verb="create", resource=REPORTS)
    assert [(e.user, e.code) for e in created] == [(AGENT_USER, 201)]

    # The Shmem attribution: a file written into the tmpfs shows under its mount point.
    (point / "data").write_bytes(b"x" * 4 * MiB)
    wait_until(
        lambda: any(
            item["name"] == str(point) and item["bytes"] >= 4 * MiB
            for item in report(kube).get("shmem", {}).get("top", [])
        ),
        message="tmpfs in the report's Shmem",
        timeout=TIMEOUT,
    )

    # A due cleanup: the wall clock reaches the rule's cron time.
    old = point / "old.log"
    old.write_bytes(b"x" * MiB)
    os.utime(old, (0, 0))
    agent.clock.now += timedelta(minutes=30)
    wait_until(lambda: not old.exists(), message="cleanup ran", timeout=TIMEOUT)
    wait_until(
        lambda: [c.get("filesRemoved") for c in report(kube).get("cleanup", [])] == [1],
        message="cleanup reported",
        timeout=TIMEOUT,
    )

    # A policy update is applied within seconds.
    kube.patch_object(
        POLICIES,
        "agent-test",
        {"spec": {"oom": [{"name": "batch", "match": {"cmdline": token}, "oomScoreAdj": 700}]}},
    )
    wait_until(lambda: adj(pid) == 700, message="update applied", timeout=TIMEOUT)
    wait_until(
        lambda: report(kube).get("policies") == [{"name": "agent-test", "generation": 2}],
        message="report at generation 2",
        timeout=TIMEOUT,
    )

    # Nothing was ever written to the policy by the agent (which did read it).
    assert agent_policy_reads(audit, start)
    assert audit.writes(since=start, user=AGENT_USER, resource=POLICIES) == []


def test_policy_for_other_nodes_does_nothing(kube, mount_tmpfs, start_agent, processes) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    kube.create_object(POLICIES, policy(point, token, pool="db"))
    pid = spawn(processes, token)
    start_agent()
    wait_until(lambda: "memory" in report(kube), message="first report", timeout=TIMEOUT)
    assert report(kube)["policies"] == []
    assert size_of(point) == 64 * MiB
    assert adj(pid) == 0
    # The node joins the pool: the policy now selects it.
    kube.patch_object(NODES, "node-a", {"metadata": {"labels": {"pool": "db"}}})
    wait_until(lambda: adj(pid) == 600, message="applied after the label change", timeout=TIMEOUT)
    assert size_of(point) == 16 * MiB


def test_two_agents_report_side_by_side_and_never_write_the_policy(
    kube, audit, mount_tmpfs, start_agent
) -> None:
    point = mount_tmpfs(options="size=64m")
    kube.create_object(POLICIES, policy(point, token_()))
    start = audit.mark()
    start_agent("node-a")
    start_agent("node-b")
    for node in ("node-a", "node-b"):
        wait_until(
            lambda n=node: (
                report(kube, n).get("policies") == [{"name": "agent-test", "generation": 1}]
            ),
            message=f"report of {node}",
            timeout=TIMEOUT,
        )
    assert agent_policy_reads(audit, start)
    assert audit.writes(since=start, user=AGENT_USER, resource=POLICIES) == []
    writes = audit.writes(since=start, user=AGENT_USER, resource=REPORTS)
    assert {e.name for e in writes if e.verb != "create"} == {"node-a", "node-b"}
    creates = [e for e in writes if e.verb == "create"]
    assert sorted((e.name, e.code) for e in creates) == [("node-a", 201), ("node-b", 201)]
    # Every write of the agents was admitted: each wrote only its own report.
    assert [e for e in writes if e.code is None or not 200 <= e.code < 300] == []


def restart_apiserver(control_plane: Any, kube: Kube) -> None:
    """Start kube-apiserver again after stop_apiserver(), and wait until it serves
    nodemem's resources: a custom resource's storage is made by the first request after a
    start and answers 429 "storage is (re)initializing" until its cache has listed (a
    fraction of a second); the test's own requests and the fixtures' cleanup must not
    meet that."""
    control_plane.start_apiserver()

    def served() -> bool:
        try:
            for resource in (POLICIES, REPORTS):
                kube.list_objects(resource)
        except ApiError as error:
            if error.status == 429:
                return False
            raise
        return True

    wait_until(served, message="nodemem's resources served again", timeout=TIMEOUT)


def agent_event_creates(audit: AuditLog, since: int) -> list[Any]:
    return [
        e
        for e in audit.requests(since=since, user=AGENT_USER, verb="create")
        if e.plural == "events"
    ]


def test_enforcement_continues_while_the_api_is_away_and_the_report_catches_up(  # noqa: PLR0917 - fixtures
    kube, audit, control_plane, mount_tmpfs, start_agent, processes
) -> None:
    point = mount_tmpfs(options="size=64m")
    # A second tmpfs the policy cannot shrink: Refused at every resync, an Event once.
    refused = mount_tmpfs("refused", options="size=64m")
    (refused / "data").write_bytes(b"x" * 24 * MiB)
    token = token_()
    document = policy(point, token)
    document["spec"]["tmpfs"].append({"path": str(refused), "size": "16Mi"})
    kube.create_object(POLICIES, document)
    start = audit.mark()
    running = start_agent()

    def tmpfs_states() -> dict[str, str]:
        return {t["path"]: t["state"] for t in report(kube).get("tmpfs", [])}

    wait_until(
        lambda: (
            tmpfs_states().get(str(point)) in ("Applied", "Unchanged")
            and tmpfs_states().get(str(refused)) == "Refused"
        ),
        message="first report",
        timeout=TIMEOUT,
    )
    assert size_of(point) == 16 * MiB
    wait_until(
        lambda: len(agent_event_creates(audit, start)) >= 1,
        message="refusal event",
        timeout=TIMEOUT,
    )
    state, writer = running.cluster_agent.agent.state, running.cluster_agent.writer
    before_outage = audit.mark()

    control_plane.stop_apiserver()
    try:
        writes = writer.writes
        pid = spawn(processes, token)  # a new process while the API is down
        wait_until(lambda: adj(pid) == 600, message="adj without the API", timeout=TIMEOUT)
        (point / "grown").write_bytes(b"x" * 8 * MiB)  # a change the report must catch up on
        # Enforcement goes on: resyncs run, the limit holds; no write gets through.
        resyncs = state.resyncs
        wait_until(
            lambda: state.resyncs >= resyncs + 5, message="resyncs without the API", timeout=TIMEOUT
        )
        assert size_of(point) == 16 * MiB
        assert writer.writes == writes
    finally:
        restart_apiserver(control_plane, kube)

    def used(path: Path) -> int:
        return next(
            (
                t.get("usedBytes", 0)
                for t in report(kube).get("tmpfs", [])
                if t["path"] == str(path)
            ),
            0,
        )

    wait_until(lambda: used(point) >= 8 * MiB, message="report caught up", timeout=TIMEOUT)
    assert tmpfs_states()[str(refused)] == "Refused"
    # The refusal went on through the outage and after it; its Event was not repeated
    # (rate-limited), nor did the outage make the agent post any other.
    resyncs = state.resyncs
    wait_until(lambda: state.resyncs >= resyncs + 5, message="more cycles", timeout=TIMEOUT)
    assert agent_event_creates(audit, before_outage) == []
    assert len(agent_event_creates(audit, start)) == 1


def test_restart_with_the_api_down_uses_the_saved_policy(  # noqa: PLR0917 - fixtures
    kube, control_plane, mount_tmpfs, start_agent, processes, tmp_path
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    kube.create_object(POLICIES, policy(point, token))
    first = start_agent(state_dir=tmp_path / "state")
    wait_until((tmp_path / "state" / "policies.yaml").exists, message="saved", timeout=TIMEOUT)
    wait_until(
        lambda: report(kube).get("policies") == [{"name": "agent-test", "generation": 1}],
        message="applied",
        timeout=TIMEOUT,
    )
    first.halt()
    control_plane.stop_apiserver()
    try:
        # The API is unreachable: the agent starts with the credentials issued before.
        second = start_agent(state_dir=tmp_path / "state", kubeconfig=first.kubeconfig)
        pid = spawn(processes, token)
        wait_until(lambda: adj(pid) == 600, message="saved policy enforced", timeout=TIMEOUT)
        assert second.cluster_agent.writer.writes == 0
    finally:
        restart_apiserver(control_plane, kube)
    # The API is back: the report resumes.
    wait_until(
        lambda: second.cluster_agent.writer.writes >= 1, message="a report written", timeout=TIMEOUT
    )
    assert report(kube)["policies"] == [{"name": "agent-test", "generation": 1}]


def listening_address(port: int) -> str | None:
    """The IPv4 address a socket of this host listens on at `port` (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # TCP_LISTEN
            return socket.inet_ntoa(bytes.fromhex(address)[::-1])
    return None


def metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    selector = r"\{" + re.escape(label_text) + r"\}" if labels else ""
    pattern = "^" + re.escape(name) + selector + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no {name}{labels} in metrics"
    return float(match.group(1))


def test_metrics_and_health_endpoints(kube, mount_tmpfs, start_agent, processes) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    kube.create_object(POLICIES, policy(point, token))
    spawn(processes, token)
    agent = start_agent()
    base = f"http://127.0.0.1:{agent.metrics_port}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except urllib.error.URLError:
            return 0, ""  # not listening yet

    wait_until(lambda: get("/readyz")[0] == 200, message="ready", timeout=TIMEOUT)
    assert get("/healthz")[0] == 200
    wait_until(
        lambda: "nodemem_tmpfs_size_bytes{" in get("/metrics")[1], message="series", timeout=TIMEOUT
    )
    # The metrics are set just before the report is written: wait for both.
    wait_until(lambda: "shmem" in report(kube), message="the first report", timeout=TIMEOUT)
    text = get("/metrics")[1]
    assert metric(text, "nodemem_tmpfs_size_bytes", path=str(point)) == 16 * MiB
    assert metric(text, "nodemem_oom_adjustments_total", rule="batch") >= 1
    # The metric follows every pass; the report is rewritten only when a figure moves by
    # more than 1 % and 1 MiB: they agree within that (and what moved in between).
    written = report(kube)["shmem"]["unaccountedBytes"]
    assert metric(text, "nodemem_shmem_unaccounted_bytes") == pytest.approx(
        written, abs=max(4 * MiB, 0.02 * abs(written))
    )
    assert metric(text, "nodemem_scan_duration_seconds") > 0
    for kind in ("tmpfs", "sysv", "memfd", "sharedAnon", "detachedTmpfs"):
        assert metric(text, "nodemem_shmem_bytes", kind=kind) >= 0
    # The series of every mode (issue 12): every tmpfs, its limit's state, the node's parts.
    dev = f"{os.major(point.stat().st_dev)}:{os.minor(point.stat().st_dev)}"
    assert metric(text, "nodemem_tmpfs_mount_size_bytes", dev=dev, path=str(point)) == 16 * MiB
    assert metric(text, "nodemem_tmpfs_mount_used_bytes", dev=dev, path=str(point)) == 0
    state = re.search(
        rf'^nodemem_tmpfs_limit_state\{{path="{re.escape(str(point))}",policy="agent-test",'
        r'state="(Applied|Unchanged)"\} 1\.0$',
        text,
        re.M,
    )
    assert state, "no Applied/Unchanged limit state"
    total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024  # MemTotal, first line
    assert metric(text, "nodemem_memory_bytes", part="total") == total


def test_an_unchanged_node_writes_no_status_between_heartbeats(kube, audit, start_agent) -> None:
    start = audit.mark()
    running = start_agent()
    state, writer = running.cluster_agent.agent.state, running.cluster_agent.writer
    wait_until(lambda: writer.writes >= 1, message="first write", timeout=TIMEOUT)

    def quiet_cycles(count: int) -> bool:
        """`count` resync cycles in a row without a write."""
        writes, resyncs = writer.writes, state.resyncs
        wait_until(
            lambda: state.resyncs >= resyncs + count, message=f"{count} cycles", timeout=TIMEOUT
        )
        return writer.writes == writes

    # Settle: what earlier tests left behind (exiting processes, freed Shmem) is a real
    # change, written once; wait for three quiet cycles in a row.
    wait_until(lambda: quiet_cycles(3), message="a settled node", timeout=TIMEOUT)
    settled, before = audit.mark(), report(kube)
    assert quiet_cycles(10), f"wrote again: {first_difference(before, report(kube))}"
    # The server saw the agent's writes before, and none of any kind since it settled.
    assert audit.writes(since=start, user=AGENT_USER, resource=REPORTS)
    assert audit.writes(since=settled, user=AGENT_USER) == []


def first_difference(old: Any, new: Any, path: str = "") -> str:
    """Where two report statuses differ meaningfully (for a failure message)."""
    from nodemem.agent.report_diff import meaningful_change  # noqa: PLC0415

    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            if meaningful_change(old.get(key), new.get(key), key):
                return first_difference(old.get(key), new.get(key), f"{path}.{key}")
    return f"{path}: {str(old)[:200]} -> {str(new)[:200]}"


def events(kube: Kube, reason: str) -> list[dict[str, Any]]:
    return [e for e in kube.list_objects(EVENTS, namespace="default") if e.get("reason") == reason]


def test_refusals_and_a_leak_suspicion_become_conditions_and_events(
    kube, audit, mount_tmpfs, start_agent
) -> None:
    point = mount_tmpfs(options="size=64m")
    (point / "data").write_bytes(b"x" * 24 * MiB)  # more than the 16Mi the policy asks
    document = policy(point, token_())
    document["spec"]["shmem"] = {"unaccountedThreshold": "1Ki"}  # any remainder is a leak
    kube.create_object(POLICIES, document)
    start = audit.mark()
    running = start_agent()
    wait_until(
        lambda: [t["state"] for t in report(kube).get("tmpfs", [])] == ["Refused"],
        message="refusal reported",
        timeout=TIMEOUT,
    )
    assert size_of(point) == 64 * MiB  # never shrunk below use
    status = report(kube)
    assert "below current use" in status["tmpfs"][0]["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Applied"]["status"] == "False"
    assert conditions["Degraded"]["status"] == "True"
    wait_until(
        lambda: len(events(kube, "TmpfsRefused")) == 1, message="refusal event", timeout=TIMEOUT
    )
    [refusal] = events(kube, "TmpfsRefused")
    assert refusal["involvedObject"]["name"] == "node-a"
    assert refusal["source"]["component"] == "nodemem-agent"
    unaccounted = status["shmem"]["unaccountedBytes"]
    if unaccounted > 1024:  # there is always some here (PID 1 is unreadable), but be exact
        assert conditions["ShmemLeakSuspected"]["status"] == "True"
        wait_until(
            lambda: len(events(kube, "ShmemLeakSuspected")) == 1,
            message="leak event",
            timeout=TIMEOUT,
        )
    # Refusals repeat every resync; the events do not (rate-limited).
    state = running.cluster_agent.agent.state
    resyncs = state.resyncs
    wait_until(lambda: state.resyncs >= resyncs + 3, message="more cycles", timeout=TIMEOUT)
    assert len(events(kube, "TmpfsRefused")) == 1
    # Posted by the agent, and every one it posted was accepted.
    posted = agent_event_creates(audit, start)
    assert posted
    assert [e.code for e in posted] == [201] * len(posted)


def test_dry_run_policy_plans_and_changes_nothing(
    kube, mount_tmpfs, start_agent, processes
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    document = policy(point, token)
    document["spec"]["dryRun"] = True
    kube.create_object(POLICIES, document)
    pid = spawn(processes, token)
    start_agent()
    wait_until(
        lambda: [t["state"] for t in report(kube).get("tmpfs", [])] == ["Planned"],
        message="planned",
        timeout=TIMEOUT,
    )
    assert report(kube)["oom"]["planned"] == 1
    assert size_of(point) == 64 * MiB
    assert adj(pid) == 0


def test_agent_command_in_a_cluster_stops_cleanly_on_sigterm(
    kube, audit, agent_kubeconfig, mount_tmpfs, tmp_path
) -> None:
    point = mount_tmpfs(options="size=64m")
    kube.create_object(POLICIES, policy(point, token_()))
    config_file = agent_kubeconfig("node-a")
    start = audit.mark()
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nodemem.cli",
            "agent",
            "--kubeconfig",
            str(config_file),
            "--state-dir",
            str(tmp_path / "state"),
            "--metrics-port",
            str(port := free_port()),
        ],
        env={**os.environ, "NODE_NAME": "node-a"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: report(kube).get("policies") == [{"name": "agent-test", "generation": 1}],
            message="report",
            timeout=TIMEOUT,
        )
        # In a cluster the default address is every interface of the pod (probes).
        assert listening_address(port) == "0.0.0.0"
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.stderr is not None
    assert "Traceback" not in agent.stderr.read()
    # The command wrote as the agent's ServiceAccount, never as the admin.
    [created] = audit.requests(since=start, verb="create", resource=REPORTS)
    assert (created.user, created.name, created.code) == (AGENT_USER, "node-a", 201)
