"""Kubernetes Events about this node's NodeMemoryReport (refusals, a leak suspicion, an
OOM loop risk): posted to the default namespace, each reason and message at most once
per `every` seconds (refusals repeat every resync; the event stream must not)."""

from __future__ import annotations

import time
from collections.abc import Callable

from nodemem.agent.kubeapi import GROUP, VERSION, RawApi
from nodemem.agent.metrics import AgentMetrics
from nodemem.agent.report_writer import count_api_error
from nodemem.api.status import now_rfc3339

EVENTS_PATH = "/api/v1/namespaces/default/events"


class ReportEvents:
    """Posts Events whose involvedObject is the node's NodeMemoryReport."""

    def __init__(
        self,
        api: RawApi,
        node: str,
        *,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.node = node
        self.metrics = metrics
        self.clock = clock
        self._recent: dict[tuple[str, str], float] = {}

    def event(
        self, reason: str, message: str, *, warning: bool = True, every: float = 600.0
    ) -> None:
        """An Event on the report; the same reason and message at most once per `every` s."""
        key = (reason, message)
        now = self.clock()
        if now - self._recent.get(key, -every) < every:
            return
        self._recent[key] = now
        stamp = now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{self.node}.", "namespace": "default"},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "NodeMemoryReport",
                "name": self.node,
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "nodemem-agent", "host": self.node},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.api.json("POST", EVENTS_PATH, body=body)
        except Exception as exc:
            count_api_error(self.metrics, "create event", exc)
