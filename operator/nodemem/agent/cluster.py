"""The agent's Kubernetes side: policies in, its own Node and pods, its report out.

- Policies: kopf, standalone, with `on.event` only: nothing is ever written to a policy
  (no annotations, no finalizers, no status), so any number of agents can watch them.
- Its own Node (field selector metadata.name) and the pods on it (spec.nodeName): the
  official client's list + watch, never all nodes or pods of the cluster.
- Its own NodeMemoryReport: created if missing (owned by the Node), status patched on a
  meaningful change or at the heartbeat. API errors are counted and retried with
  backoff; enforcement never waits for the API.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes.watch.watch import iter_resp_lines

from nodemem.agent.metrics import AgentMetrics
from nodemem.agent.report_diff import meaningful_change
from nodemem.agent.state_dir import StateDir
from nodemem.api.manifest import PolicyError, validate_policy
from nodemem.api.policy import NodeMemoryPolicy
from nodemem.api.status import Condition, NodeMemoryReportStatus, now_rfc3339
from nodemem.policy.pods import PodDirectory, pod_from_object

log = logging.getLogger("nodemem.agent")

GROUP, VERSION = "nodemem.dev", "v1alpha1"
POLICIES, REPORTS = "nodememorypolicies", "nodememoryreports"
MAX_BACKOFF = 60.0


class ClusterPolicies:
    """A PolicySource fed by kopf events; the policies in force are saved on the host.

    Until the API answers, the saved policies are in force (an outage or a restart
    must not lift the limits). Invalid policies are skipped: the controller reports them.
    `confirmed` is set by the first authoritative LIST (`replace_all`): before it the set
    in force may be stale or partial (saved, or some watch events only), and nothing is
    undone on its account.
    """

    def __init__(self, state_dir: StateDir | None) -> None:
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self._objects: dict[str, NodeMemoryPolicy] = {}
        saved = state_dir.load_policies() if state_dir else None
        self._changed = True  # the first call answers: saved policies, or none yet
        self.confirmed = threading.Event()
        # Watch events are numbered, so that a LIST answered before an event cannot undo
        # it (see replace_all): name -> number of the last event about it.
        self._events = 0
        self._touched: dict[str, int] = {}
        if saved:
            self._objects = {p.name: p for p in saved}
            log.info("loaded saved policies: %s", ", ".join(self._objects) or "none")

    def on_event(self, type: str | None, body: kopf.Body, name: str, **_: Any) -> None:
        """kopf on.event handler (reads only)."""
        with self._lock:
            self._events += 1
            self._touched[name] = self._events
            if type == "DELETED":
                changed = self._objects.pop(name, None) is not None
            else:
                try:
                    policy = validate_policy(dict(body))
                except PolicyError as exc:
                    log.warning("policy %s is invalid, not applied: %s", name, exc)
                    changed = self._objects.pop(name, None) is not None
                else:
                    changed = self._objects.get(name) != policy
                    self._objects[name] = policy
            self._changed |= changed

    def events_seen(self) -> int:
        """Call before a LIST; pass the number to replace_all with its answer."""
        with self._lock:
            return self._events

    def replace_all(self, objects: Sequence[dict[str, Any]], since: int | None = None) -> None:
        """The authoritative set from a LIST: drops policies deleted meanwhile (saved ones
        deleted during an outage, or one deleted before the watch began, of which the
        watch never tells). A policy a watch event touched after `since` (events_seen()
        when the LIST was sent) keeps what that newer event said."""
        policies: dict[str, NodeMemoryPolicy] = {}
        for obj in objects:
            try:
                policy = validate_policy(obj)
            except PolicyError:
                continue
            policies[policy.name] = policy
        with self._lock:
            if since is not None:
                for name, number in self._touched.items():
                    if number <= since:
                        continue
                    policies.pop(name, None)
                    if name in self._objects:
                        policies[name] = self._objects[name]
            # The first LIST also makes the agent resync at once: undo may act now.
            if policies != self._objects or not self.confirmed.is_set():
                self._objects = policies
                self._changed = True
            self.confirmed.set()

    def settled(self) -> bool:
        """Confirmed by the API, and no change waiting for the agent to take it."""
        with self._lock:
            return self.confirmed.is_set() and not self._changed

    def __call__(self) -> Sequence[NodeMemoryPolicy] | None:
        with self._lock:
            if not self._changed:
                return None
            self._changed = False
            policies = sorted(self._objects.values(), key=lambda p: p.name)
        if self.state_dir is not None:
            try:
                self.state_dir.save_policies(policies)
            except OSError as exc:
                log.error("cannot save policies to %s: %s", self.state_dir.path, exc)
        return policies


def policy_registry(
    policies: ClusterPolicies, login: Callable[..., kopf.ConnectionInfo]
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login)
    kopf.on.event(GROUP, VERSION, POLICIES, registry=registry)(policies.on_event)

    @kopf.on.startup(registry=registry)
    def _settings(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # kopf's own events would go to shared objects
        settings.scanning.disabled = True  # no cluster-wide discovery of namespaces, CRDs
        settings.watching.server_timeout = 300

    return registry


def run_policy_feed(
    policies: ClusterPolicies, login: Callable[..., kopf.ConnectionInfo], stop: threading.Event
) -> threading.Thread:
    """kopf in its own thread and loop (never in another loop: its stop cancels tasks)."""

    def main() -> None:
        kopf.run(
            registry=policy_registry(policies, login),
            standalone=True,
            clusterwide=True,
            stop_flag=stop,
        )

    thread = threading.Thread(target=main, name="policy-feed", daemon=True)
    thread.start()
    return thread


class Backoff:
    def __init__(self) -> None:
        self.delay = 0.0

    def failed(self, stop: threading.Event) -> None:
        self.delay = min(MAX_BACKOFF, max(1.0, self.delay * 2))
        stop.wait(self.delay)

    def succeeded(self) -> None:
        self.delay = 0.0


class RawApiError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:300].decode(errors='replace')}")
        self.status = status


class RawApi:
    """JSON requests to the core API, without the client's generated models: importing
    CoreV1Api loads hundreds of model modules, MiBs of RSS in an agent on every node
    (README, Performance: bench/agent_load.py)."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.api_client = api_client

    def _request(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        body: dict[str, Any] | None = None,
        timeout: float | tuple[float, float] | None = 30.0,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        method, url, headers, payload, _ = self.api_client.param_serialize(
            method,
            path,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        return self.api_client.call_api(
            method, url, header_params=headers, body=payload, _request_timeout=timeout
        )

    def json(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        body: dict[str, Any] | None = None,
    ) -> Any:
        response = self._request(method, path, query, body)
        data: bytes = response.read()
        if not 200 <= response.status < 300:
            raise RawApiError(response.status, data)
        return json.loads(data)

    def watch(self, path: str, query: Sequence[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        """Watch events as dicts; the server ends the stream after `timeoutSeconds`."""
        response = self._request(
            "GET",
            path,
            [*query, ("watch", "true"), ("timeoutSeconds", "60")],
            timeout=(10.0, 90.0),
        )
        if not 200 <= response.status < 300:
            raise RawApiError(response.status, response.read())
        try:
            for line in iter_resp_lines(response.response):  # type: ignore[no-untyped-call]
                if line:
                    yield json.loads(line)
        finally:
            response.response.release_conn()


def watch_forever(
    api: RawApi,
    path: str,
    on_list: Callable[[list[dict[str, Any]]], None],
    on_event: Callable[[str, dict[str, Any]], None],
    stop: threading.Event,
    *,
    metrics: AgentMetrics | None,
    operation: str,
    field_selector: str,
) -> None:
    """List, then watch from the list's resourceVersion; re-list on any failure."""
    backoff = Backoff()
    selector = [("fieldSelector", field_selector)]
    while not stop.is_set():
        try:
            listed = api.json("GET", path, selector)
            on_list(listed.get("items") or [])
            version = listed["metadata"]["resourceVersion"]
            backoff.succeeded()
            while not stop.is_set():
                for event in api.watch(path, [*selector, ("resourceVersion", version)]):
                    if stop.is_set():
                        return
                    if event["type"] == "ERROR":  # e.g. 410 Gone: list again
                        raise RawApiError(event["object"].get("code", 0), b"watch error")
                    if event["type"] == "BOOKMARK":
                        version = event["object"]["metadata"]["resourceVersion"]
                        continue
                    on_event(event["type"], event["object"])
                    version = event["object"]["metadata"]["resourceVersion"]
        except Exception as exc:  # API down, 410 Gone, ...: list again after a pause
            if metrics is not None:
                metrics.api_errors.labels(operation=operation).inc()
            log.warning("%s: %s; retrying in %.0f s", operation, exc, max(1.0, backoff.delay * 2))
            backoff.failed(stop)


def start_watch(
    api: RawApi,
    path: str,
    on_list: Callable[[list[dict[str, Any]]], None],
    on_event: Callable[[str, dict[str, Any]], None],
    stop: threading.Event,
    *,
    metrics: AgentMetrics | None,
    operation: str,
    field_selector: str,
) -> threading.Thread:
    """`watch_forever` in a daemon thread of its own."""
    thread = threading.Thread(
        target=watch_forever,
        args=(api, path, on_list, on_event, stop),
        kwargs={"metrics": metrics, "operation": operation, "field_selector": field_selector},
        name=operation,
        daemon=True,
    )
    thread.start()
    return thread


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

    def run(self, stop: threading.Event, metrics: AgentMetrics | None) -> threading.Thread:
        def on_list(items: list[dict[str, Any]]) -> None:
            for node in items:
                self._update(node)

        def on_event(type_: str, node: dict[str, Any]) -> None:
            if type_ in ("ADDED", "MODIFIED"):
                self._update(node)

        return start_watch(
            self.api,
            "/api/v1/nodes",
            on_list,
            on_event,
            stop,
            metrics=metrics,
            operation="watch node",
            field_selector=f"metadata.name={self.name}",
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

    def run(self, stop: threading.Event, metrics: AgentMetrics | None) -> threading.Thread:
        def on_list(items: list[dict[str, Any]]) -> None:
            self.pods = {p["metadata"]["uid"]: p for p in items}
            self._publish()

        def on_event(type_: str, pod: dict[str, Any]) -> None:
            if type_ == "DELETED":
                self.pods.pop(pod["metadata"]["uid"], None)
            else:
                self.pods[pod["metadata"]["uid"]] = pod
            self._publish()

        return start_watch(
            self.api,
            "/api/v1/pods",
            on_list,
            on_event,
            stop,
            metrics=metrics,
            operation="watch pods",
            field_selector=f"spec.nodeName={self.node}",
        )


class ReportWriter:
    """Writes this node's NodeMemoryReport status: on a meaningful change or a heartbeat."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        node: str,
        *,
        heartbeat: float = 300.0,
        node_uid: Callable[[], str | None] = lambda: None,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.custom = k8s.CustomObjectsApi(api_client)
        self.raw = RawApi(api_client)
        self.node = node
        self.heartbeat = heartbeat
        self.node_uid = node_uid
        self.metrics = metrics
        self.clock = clock
        self.last_written: dict[str, Any] | None = None
        self.last_time = 0.0
        self.exists = False
        self.writes = 0
        self.previous_conditions: list[Condition] = []
        self._recent_events: dict[tuple[str, str], float] = {}

    def due(self, body: dict[str, Any]) -> bool:
        if self.last_written is None:
            return True
        if self.clock() - self.last_time >= self.heartbeat:
            return True
        return meaningful_change(self.last_written, body)

    def write(self, status: NodeMemoryReportStatus) -> bool:
        """Write if due; False when skipped or when the API refused (retried next cycle)."""
        body = status.model_dump(by_alias=True, exclude_none=True)
        if not self.due(body):
            return False
        try:
            if not self.exists:
                self._create()
            self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, REPORTS, self.node, {"status": body}
            )
        except k8s.ApiException as exc:
            if exc.status == 404:
                self.exists = False  # deleted under us: create it again next time
            self._api_error("write report", exc)
            return False
        except Exception as exc:  # connection refused, timeouts: the API is away
            self._api_error("write report", exc)
            return False
        self.previous_conditions = status.conditions
        self.last_written = body
        self.last_time = self.clock()
        self.writes += 1
        return True

    def _create(self) -> None:
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "NodeMemoryReport",
            "metadata": {"name": self.node},
        }
        uid = self.node_uid()
        if uid:
            body["metadata"]["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": uid}
            ]
        try:
            self.custom.create_cluster_custom_object(GROUP, VERSION, REPORTS, body)
        except k8s.ApiException as exc:
            if exc.status != 409:  # 409: it exists already, which is what we want
                raise
        self.exists = True

    def _api_error(self, operation: str, exc: Exception) -> None:
        if self.metrics is not None:
            self.metrics.api_errors.labels(operation=operation).inc()
        log.warning("%s failed: %s", operation, exc)

    def event(
        self, reason: str, message: str, *, warning: bool = True, every: float = 600.0
    ) -> None:
        """A Kubernetes Event on the report; the same reason and message at most once per
        `every` seconds (refusals repeat every resync; the event stream must not)."""
        key = (reason, message)
        now = self.clock()
        if now - self._recent_events.get(key, -every) < every:
            return
        self._recent_events[key] = now
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
            self.raw.json("POST", "/api/v1/namespaces/default/events", body=body)
        except Exception as exc:
            self._api_error("create event", exc)
