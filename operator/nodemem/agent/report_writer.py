"""The report out: this node's NodeMemoryReport, created if missing (owned by the Node),
its status patched on a meaningful change or at the heartbeat. API errors are counted
and retried at the next cycle; enforcement never waits for the API.

The owner reference is what lets the cluster's garbage collector delete the report
with its Node. The agent's first cycle may write before its Node watch has answered (a
busy API server, an outage at start): the report is then created without an owner, and
the owner is added at the first cycle after the Node's uid is known.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from nodemem.agent.kubeapi import GROUP, REPORTS_PATH, VERSION, RawApi, RawApiError
from nodemem.agent.metrics import AgentMetrics
from nodemem.agent.report_diff import meaningful_change
from nodemem.api.status import Condition, NodeMemoryReportStatus

log = logging.getLogger("nodemem.agent")


def count_api_error(metrics: AgentMetrics | None, operation: str, exc: Exception) -> None:
    if metrics is not None:
        metrics.api_errors.labels(operation=operation).inc()
    log.warning("%s failed: %s", operation, exc)


class ReportWriter:
    """Writes this node's NodeMemoryReport status: on a meaningful change or a heartbeat."""

    def __init__(
        self,
        api: RawApi,
        node: str,
        *,
        heartbeat: float = 300.0,
        node_uid: Callable[[], str | None] = lambda: None,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.node = node
        self.heartbeat = heartbeat
        self.node_uid = node_uid
        self.metrics = metrics
        self.clock = clock
        self.last_written: dict[str, Any] | None = None
        self.last_time = 0.0
        self.exists = False
        self.owned = False  # the report, as created or found, names the Node as its owner
        self.writes = 0
        self.previous_conditions: list[Condition] = []

    def due(self, body: dict[str, Any]) -> bool:
        if self.last_written is None:
            return True
        if self.clock() - self.last_time >= self.heartbeat:
            return True
        return meaningful_change(self.last_written, body)

    def write(self, status: NodeMemoryReportStatus) -> bool:
        """Write if due; False when skipped or when the API refused (retried next cycle)."""
        body = status.model_dump(by_alias=True, exclude_none=True)
        if self.exists and not self.owned:
            self._claim_for_node()
        if not self.due(body):
            return False
        try:
            if not self.exists:
                self._create()
            # A merge patch keeps what it does not name: with the nulls, a section that
            # became empty (no OOM data, no Shmem summary) is removed, not left stale.
            self.api.json(
                "PATCH",
                f"{REPORTS_PATH}/{self.node}/status",
                body={"status": status.model_dump(by_alias=True)},
                content_type="application/merge-patch+json",
            )
        except RawApiError as exc:
            if exc.status == 404:
                self.exists = False  # deleted under us: create it again next time
            count_api_error(self.metrics, "write report", exc)
            return False
        except Exception as exc:  # connection refused, timeouts: the API is away
            count_api_error(self.metrics, "write report", exc)
            return False
        self.previous_conditions = status.conditions
        self.last_written = body
        self.last_time = self.clock()
        self.writes += 1
        return True

    def _owner_references(self, uid: str) -> list[dict[str, str]]:
        return [{"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": uid}]

    def _create(self) -> None:
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "NodeMemoryReport",
            "metadata": {"name": self.node},
        }
        uid = self.node_uid()
        if uid:
            body["metadata"]["ownerReferences"] = self._owner_references(uid)
        try:
            self.api.json("POST", REPORTS_PATH, body=body)
        except RawApiError as exc:
            if exc.status != 409:  # 409: it exists already, which is what we want
                raise
            uid = None  # an existing report: its owner is unknown, claimed next
        self.exists = True
        self.owned = bool(uid)

    def _claim_for_node(self) -> None:
        """Name the Node as the report's owner, once its uid is known."""
        uid = self.node_uid()
        if not uid:
            return
        try:
            self.api.json(
                "PATCH",
                f"{REPORTS_PATH}/{self.node}",
                body={"metadata": {"ownerReferences": self._owner_references(uid)}},
                content_type="application/merge-patch+json",
            )
        except RawApiError as exc:
            if exc.status == 404:
                self.exists = False
            count_api_error(self.metrics, "own report", exc)
            return
        except Exception as exc:  # the API is away: again next cycle
            count_api_error(self.metrics, "own report", exc)
            return
        self.owned = True
