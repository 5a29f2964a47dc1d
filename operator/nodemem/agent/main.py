"""`nodemem agent` in a cluster: wires the loop, the API side, reporting and metrics.

The API side, one module a job, all on one client (`kubeapi.RawApi`) and, for what the
agent follows, one list-watch loop (`listwatch.ListWatch`, a thread per feed):
`policy_feed` (policies in), `node_feed` (its own Node and pods), `report_writer` (its
NodeMemoryReport out), `events` (Events on that report).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kubernetes import client as k8s

from nodemem.agent.events import ReportEvents
from nodemem.agent.kubeapi import RawApi
from nodemem.agent.loop import AgentSettings, NodeAgent
from nodemem.agent.metrics import DEFAULT_TOP_OBJECTS, AgentMetrics, CycleMetrics, serve
from nodemem.agent.node_feed import OwnNode, OwnPods
from nodemem.agent.policy_feed import ClusterPolicies, policy_feed
from nodemem.agent.report_writer import ReportWriter
from nodemem.agent.state_dir import StateDir
from nodemem.api.status import NodeMemoryReportStatus
from nodemem.host.originals import AGENT_FILE, Originals
from nodemem.host.paths import HostPaths
from nodemem.policy.pods import PodDirectory
from nodemem.policy.report import node_report_status

log = logging.getLogger("nodemem.agent")


@dataclass
class ClusterAgentOptions:
    node_name: str
    state_dir: Path
    metrics_port: int | None = 8080
    resync_seconds: float = 30.0
    heartbeat_seconds: float = 300.0
    relist_seconds: float = 300.0  # how soon a deletion the watch never saw is noticed
    dry_run: bool = False
    paths: HostPaths = field(default_factory=HostPaths)
    metrics_host: str = "0.0.0.0"
    metrics_top_objects: int = DEFAULT_TOP_OBJECTS
    poll_seconds: float = 1.0  # how soon a policy or node label change is acted on
    nri_rules_file: Path | None = None  # the NRI plugin's rules (agent/nri_rules.py)
    wall_clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))  # cron


class Reporter:
    """After every cycle: attribute Shmem, preview the OOM, write the report if due,
    post Events for new refusals, a new leak suspicion or OOM loop risk, update the metrics."""

    def __init__(
        self, writer: ReportWriter, events: ReportEvents, metrics: AgentMetrics, paths: HostPaths
    ) -> None:
        self.writer = writer
        self.events = events
        self.observer = CycleMetrics(metrics, paths)

    def __call__(self, agent: NodeAgent) -> None:
        effective, applied, host = self.observer.observe(agent)
        status = node_report_status(
            effective,
            applied,
            host,
            list(agent.state.cleanups.values()),
            self.writer.previous_conditions,
        )
        before = {c.type: c.status for c in self.writer.previous_conditions}
        reasons = {c.type: c.reason for c in self.writer.previous_conditions}
        if self.writer.write(status):
            self._post_events(status, before, reasons)

    def _post_events(
        self,
        status: NodeMemoryReportStatus,
        before: Mapping[str, str],
        before_reasons: Mapping[str, str] | None = None,
    ) -> None:
        for item in status.tmpfs:
            if item.state in ("Refused", "Failed", "RestoreRefused"):
                self.events.event(f"Tmpfs{item.state}", f"{item.path}: {item.message}")
        if status.oom is not None:
            for failure in status.oom.failures:
                if failure.state == "Vanished":
                    continue  # the process was gone: nothing for anyone to do
                self.events.event(
                    f"OomScoreAdj{failure.state}", f"rule {failure.rule}: {failure.message}"
                )
        for cleanup in status.cleanup:
            if cleanup.state != "Completed":  # a base off tmpfs, a typo, a crossed mount
                self.events.event(
                    f"Cleanup{cleanup.state}", f"rule {cleanup.name}: {cleanup.message}"
                )
            for error in cleanup.errors[:3]:
                self.events.event("CleanupFailed", f"rule {cleanup.name}: {error}")
        leak = next((c for c in status.conditions if c.type == "ShmemLeakSuspected"), None)
        if leak is not None and leak.status == "True" and before.get(leak.type) != "True":
            self.events.event("ShmemLeakSuspected", leak.message)
        loop = next((c for c in status.conditions if c.type == "OOMLoopRisk"), None)
        # Once when a risk appears, once more when it becomes a loop (repeated kills).
        if loop is not None and loop.status == "True" and before.get(loop.type) != "True":
            self.events.event("OOMLoopRisk", loop.message)
        elif (
            loop is not None
            and loop.reason == "RepeatedOOMKills"
            and ((before_reasons or {}).get(loop.type) != "RepeatedOOMKills")
        ):
            self.events.event("OOMLoop", loop.message)


class ClusterAgent:
    """Everything the agent runs in a cluster; `run()` blocks until `stop` is set."""

    def __init__(
        self,
        options: ClusterAgentOptions,
        configuration: k8s.Configuration,
        stop: threading.Event | None = None,
    ) -> None:
        self.options = options
        self.configuration = configuration
        self.stop = stop or threading.Event()
        self.api_client = k8s.ApiClient(configuration)
        self.api = RawApi(self.api_client)  # the one client of every feed and write
        self.metrics = AgentMetrics(options.metrics_top_objects)
        self.state_dir = StateDir(options.state_dir)
        self.policies = ClusterPolicies(self.state_dir)
        # Set by the first answer of each watch: until then the node's labels and pods
        # are the saved ones, or none, and a target they no longer select is not undone.
        self.node_seen = threading.Event()
        self.pods_listed = threading.Event()
        self.writer = ReportWriter(
            self.api,
            options.node_name,
            heartbeat=options.heartbeat_seconds,
            metrics=self.metrics,
        )
        self.events = ReportEvents(self.api, options.node_name, metrics=self.metrics)
        self.agent = NodeAgent(
            options.paths,
            self.policies,
            node_labels=self.state_dir.load_node_labels(),
            settings=AgentSettings(
                resync_seconds=options.resync_seconds,
                poll_seconds=options.poll_seconds,
                dry_run=options.dry_run,
                nri_rules_file=options.nri_rules_file,
            ),
            on_cycle=Reporter(self.writer, self.events, self.metrics, options.paths),
            wall_clock=options.wall_clock,
            originals=Originals(options.state_dir / AGENT_FILE, options.paths),
            restore_allowed=self.restore_allowed,
        )

    def restore_allowed(self) -> bool:
        """Undo only on what the API said: an outage keeps the saved state in force."""
        return self.policies.settled() and self.node_seen.is_set() and self.pods_listed.is_set()

    def run(self) -> None:
        options, agent, stop = self.options, self.agent, self.stop

        def node_labels(labels: dict[str, str]) -> None:
            agent.set_node_labels(labels)
            self.node_seen.set()
            try:
                self.state_dir.save_node_labels(labels)
            except OSError as exc:
                log.error("cannot save node labels to %s: %s", self.state_dir.path, exc)

        own_node = OwnNode(self.api, options.node_name, node_labels)
        self.writer.node_uid = lambda: own_node.uid

        def pods(directory: PodDirectory) -> None:
            agent.pods = directory
            self.pods_listed.set()

        feeds = [
            own_node.feed(self.metrics),
            OwnPods(self.api, options.node_name, pods).feed(self.metrics),
            policy_feed(
                self.api, self.policies, relist_seconds=options.relist_seconds, metrics=self.metrics
            ),
        ]
        threads = [feed.start(stop) for feed in feeds]
        server = None
        if options.metrics_port is not None:
            server = serve(
                self.metrics,
                options.metrics_port,
                ready=lambda: agent.state.resyncs > 0,
                host=options.metrics_host,
            )

        def stop_agent_when_asked() -> None:
            stop.wait()
            agent.stop()

        threading.Thread(target=stop_agent_when_asked, daemon=True).start()
        try:
            agent.run()
        finally:
            stop.set()
            for feed in feeds:
                feed.interrupt()  # an open watch ends now, not at the server's timeout
            for thread in threads:
                thread.join(timeout=10)
            if server is not None:
                server.shutdown()
                server.server_close()


def run_cluster_agent(
    options: ClusterAgentOptions,
    configuration: k8s.Configuration,
    stop: threading.Event | None = None,
) -> NodeAgent:
    """Run until `stop` is set (or the returned agent's stop()); blocks."""
    cluster_agent = ClusterAgent(options, configuration, stop)
    cluster_agent.run()
    return cluster_agent.agent
