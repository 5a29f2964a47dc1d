"""The agent's own Node and the pods on it, each followed by a list-watch loop.

Never all nodes or pods of the cluster: the Node by field selector metadata.name, the
pods by spec.nodeName (the agent's RBAC relies on it: charts/nodemem agent-rbac.yaml).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from nodemem.agent.kubeapi import RawApi
from nodemem.agent.listwatch import ListWatch
from nodemem.agent.metrics import AgentMetrics
from nodemem.policy.pods import PodDirectory, pod_from_object


class OwnNode:
    """The agent's own Node: labels (for nodeSelector) and uid (for the report's owner)."""

    def __init__(self, api: RawApi, name: str, on_labels: Callable[[dict[str, str]], None]):
        self.api = api
        self.name = name
        self.on_labels = on_labels
        self.uid: str | None = None
        self.seen = threading.Event()

    def _update(self, node: dict[str, Any]) -> None:
        self.uid = node["metadata"]["uid"]
        self.on_labels(dict(node["metadata"].get("labels") or {}))
        self.seen.set()

    def _on_list(self, items: list[dict[str, Any]]) -> None:
        for node in items:
            self._update(node)

    def _on_event(self, type_: str, node: dict[str, Any]) -> None:
        if type_ in ("ADDED", "MODIFIED"):
            self._update(node)

    def feed(self, metrics: AgentMetrics | None) -> ListWatch:
        return ListWatch(
            self.api,
            "/api/v1/nodes",
            on_list=self._on_list,
            on_event=self._on_event,
            operation="watch node",
            field_selector=f"metadata.name={self.name}",
            metrics=metrics,
        )


class OwnPods:
    """The pods on this node (spec.nodeName), for oom rules' pod criteria."""

    def __init__(self, api: RawApi, node: str, on_pods: Callable[[PodDirectory], None]):
        self.api = api
        self.node = node
        self.on_pods = on_pods
        self.pods: dict[str, dict[str, Any]] = {}

    def _publish(self) -> None:
        self.on_pods(PodDirectory([pod_from_object(p) for p in self.pods.values()]))

    def _on_list(self, items: list[dict[str, Any]]) -> None:
        self.pods = {p["metadata"]["uid"]: p for p in items}
        self._publish()

    def _on_event(self, type_: str, pod: dict[str, Any]) -> None:
        if type_ == "DELETED":
            self.pods.pop(pod["metadata"]["uid"], None)
        else:
            self.pods[pod["metadata"]["uid"]] = pod
        self._publish()

    def feed(self, metrics: AgentMetrics | None) -> ListWatch:
        return ListWatch(
            self.api,
            "/api/v1/pods",
            on_list=self._on_list,
            on_event=self._on_event,
            operation="watch pods",
            field_selector=f"spec.nodeName={self.node}",
            metrics=metrics,
        )
