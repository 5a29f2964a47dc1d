"""The agent's list-watch loop (nodemem.agent.listwatch) against the real kube-apiserver,
as the chart's agent ServiceAccount.

LIST, then WATCH from the list's resourceVersion with bookmarks; the next watch resumes
from the last version (a bookmark's included) without a LIST; a version the server has
forgotten (410 Gone, after an API server restart) means LIST again at once; failures
pause 1 s doubling up to a cap; the policy feed LISTs again every relist_seconds; and
stopping ends an open watch at once. Requests are read from the server's audit log.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from controlplane import ControlPlane
from kubernetes import client as k8s
from restclient import ApiError, AuditLog, Kube, wait_until

from conftest import AGENT_USER, POLICIES, REPORTS
from nodemem.agent.kubeapi import Backoff, RawApi
from nodemem.agent.listwatch import ListWatch
from nodemem.agent.metrics import AgentMetrics
from nodemem.agent.policy_feed import ClusterPolicies, policy_feed
from nodemem.kube import load_client_config

NODES_PATH = "/api/v1/nodes"
PODS_PATH = "/api/v1/pods"
POLICIES_PATH = "/apis/nodemem.dev/v1alpha1/nodememorypolicies"
ERASED_KEY = "/registry/nodemem.dev/nodememorypolicies/erased"  # its etcd key


@dataclass
class Request:
    verb: str
    path: str
    query: dict[str, str]
    code: int | None
    received: datetime
    done: datetime


def agent_requests(
    plane: ControlPlane, since: int, path: str, *, stage: str = "ResponseComplete"
) -> list[Request]:
    """The agent's requests to `path` after `since`, in the order the server got them
    (a watch is logged at ResponseStarted when it opens, at ResponseComplete when it ends)."""
    found = []
    for event in AuditLog(plane.audit_log).events(since):
        if event.stage != stage or event.user != AGENT_USER:
            continue
        uri = urllib.parse.urlsplit(event.uri)
        if uri.path != path:
            continue
        found.append(
            Request(
                verb=event.verb,
                path=uri.path,
                query={k: v[-1] for k, v in urllib.parse.parse_qs(uri.query).items()},
                code=event.code,
                received=datetime.fromtimestamp(event.received, UTC),
                done=datetime.fromtimestamp(event.completed, UTC),
            )
        )
    return sorted(found, key=lambda r: r.received)


class Recorder:
    """What the loop hands its callbacks: the names of each LIST, each event."""

    def __init__(self) -> None:
        self.lists: list[list[str]] = []
        self.events: list[tuple[str, str, dict[str, str]]] = []
        self.threads: set[str] = set()

    def on_list(self, items: list[dict[str, Any]]) -> None:
        self.threads.add(threading.current_thread().name)
        self.lists.append(sorted(i["metadata"]["name"] for i in items))

    def on_event(self, type_: str, obj: dict[str, Any]) -> None:
        self.threads.add(threading.current_thread().name)
        meta = obj["metadata"]
        self.events.append((type_, meta["name"], dict(meta.get("labels") or {})))


@pytest.fixture
def agent_api(
    agent_token: Callable[..., str], kubeconfig_for_token: Callable[[str], Any]
) -> Callable[[str], RawApi]:
    """A RawApi logged in as the chart's agent ServiceAccount, bound to a pod on `node`."""

    def make(node: str) -> RawApi:
        path = kubeconfig_for_token(agent_token(node))
        return RawApi(k8s.ApiClient(load_client_config(str(path))))

    return make


@pytest.fixture
def run_loop() -> Iterator[Callable[[ListWatch], threading.Thread]]:
    running: list[tuple[ListWatch, threading.Event, threading.Thread]] = []

    def start(loop: ListWatch) -> threading.Thread:
        stop = threading.Event()
        thread = loop.start(stop)
        running.append((loop, stop, thread))
        return thread

    yield start
    for loop, stop, _ in running:
        stop.set()
        loop.interrupt()
    for _, _, thread in running:
        thread.join(10)
        assert not thread.is_alive(), f"{thread.name} did not stop"


def policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": name},
        "spec": {"tmpfs": [{"path": "/dev/shm", "size": "1Gi"}]},
    }


def served(kube: Kube) -> bool:
    """Every kind the tests and the fixtures' cleanup list is served (after a restart the
    watch caches answer 429 until they are filled)."""
    try:
        for resource in (POLICIES, REPORTS, "v1/nodes"):
            kube.list_objects(resource)
        for resource in ("v1/pods", "v1/events", "events.k8s.io/v1/events"):
            kube.list_objects(resource, namespace="default")
    except ApiError as error:
        if error.status == 429:
            return False
        raise
    return True


def api_errors(metrics: AgentMetrics, operation: str) -> float:
    value = metrics.registry.get_sample_value("nodemem_api_errors_total", {"operation": operation})
    return value or 0.0


def etcd(plane: ControlPlane, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """etcd's own JSON gateway (v3), beside the API server."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{plane.ports['etcd']}/v3/{method}",
        data=json.dumps(body).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_one_list_then_watches_that_resume_from_the_last_version_and_bookmarks(
    kube: Kube, audit: AuditLog, control_plane: ControlPlane, agent_api: Any, run_loop: Any
) -> None:
    api = agent_api("lw-node")  # the Node exists now
    start = audit.mark()
    seen = Recorder()
    loop = ListWatch(
        api,
        NODES_PATH,
        on_list=seen.on_list,
        on_event=seen.on_event,
        operation="watch node",
        field_selector="metadata.name=lw-node",
        watch_timeout=5,  # the server sends a bookmark 2 s before it ends a watch
    )
    run_loop(loop)
    wait_until(lambda: seen.lists == [["lw-node"]], message="the LIST")
    audit.wait_for_watch("v1/nodes", user=AGENT_USER, since=start)
    [listed] = agent_requests(control_plane, start, NODES_PATH)
    assert listed.verb == "list" and listed.code == 200
    assert listed.query["fieldSelector"] == "metadata.name=lw-node"
    first = agent_requests(control_plane, start, NODES_PATH, stage="ResponseStarted")[0]
    assert first.verb == "watch" and first.received >= listed.received
    assert first.query["allowWatchBookmarks"] == "true"
    assert first.query["fieldSelector"] == "metadata.name=lw-node"
    node = kube.get_object("v1/nodes", "lw-node")
    # From the LIST's version: what it had listed is not told again as ADDED.
    assert int(first.query["resourceVersion"]) >= int(node["metadata"]["resourceVersion"])
    assert ("ADDED", "lw-node") not in [(t, n) for t, n, _ in seen.events]

    kube.patch_object("v1/nodes", "lw-node", {"metadata": {"labels": {"pool": "db"}}})
    wait_until(
        lambda: (
            ("MODIFIED", "lw-node", "db")
            in [(t, n, labels.get("pool")) for t, n, labels in seen.events]
        ),
        message="the label change as an event",
    )

    # Another Node moves the resourceVersion on; the field selector keeps it out of the
    # stream, and a bookmark brings its version: the next watch resumes from there.
    other = kube.create_object("v1/nodes", {"metadata": {"name": "lw-other"}})
    moved = int(other["metadata"]["resourceVersion"])

    def resumed_past_it() -> bool:
        watches = agent_requests(control_plane, start, NODES_PATH, stage="ResponseStarted")
        return any(int(w.query["resourceVersion"]) >= moved for w in watches)

    wait_until(resumed_past_it, timeout=20, message="a watch from the bookmark's version")
    assert loop.bookmarks >= 1
    assert "lw-other" not in [n for _, n, _ in seen.events]
    # Watches ended by the server's timeout are resumed, never listed again.
    assert [r.verb for r in agent_requests(control_plane, start, NODES_PATH)].count("list") == 1
    assert loop.lists == 1 and len(seen.lists) == 1
    assert seen.threads == {"watch node"}  # the callbacks run in the loop's own thread


def test_a_version_the_restarted_server_forgot_is_gone_and_the_loop_lists_again_at_once(
    kube: Kube, audit: AuditLog, control_plane: ControlPlane, agent_api: Any, run_loop: Any
) -> None:
    api = agent_api("lw-gone")
    kube.create_object(POLICIES, policy("kept"))
    kube.create_object(POLICIES, policy("erased"))
    policies = ClusterPolicies(None)
    metrics = AgentMetrics()
    loop = policy_feed(api, policies, relist_seconds=3600, metrics=metrics)
    loop.backoff = Backoff(initial=2.0, maximum=2.0)  # a pause would show: 2 s
    start = audit.mark()
    run_loop(loop)
    names: list[str] = []

    def in_force(expected: list[str]) -> Callable[[], bool]:
        def check() -> bool:
            current = policies()
            if current is not None:
                names[:] = [p.name for p in current]
            return policies.confirmed.is_set() and names == expected

        return check

    wait_until(in_force(["erased", "kept"]), message="both policies listed")
    audit.wait_for_watch(POLICIES, user=AGENT_USER, since=start)
    version = loop.version
    assert version is not None

    # While the API server is down, "erased" goes from etcd and etcd forgets the past
    # (compaction): no watch can tell of it; the new server's watch cache starts now.
    control_plane.stop_apiserver()
    try:
        deleted = etcd(control_plane, "kv/deleterange", {"key": b64(ERASED_KEY)})
        assert deleted.get("deleted") == "1"
        revision = deleted["header"]["revision"]
        etcd(control_plane, "kv/compaction", {"revision": revision, "physical": True})
        restarted = audit.mark()
    finally:
        control_plane.start_apiserver()
        wait_until(lambda: served(kube), timeout=30, message="the server's caches")

    wait_until(in_force(["kept"]), timeout=40, message="the LIST after 410 Gone")
    assert loop.lists == 2
    requests = agent_requests(control_plane, restarted, POLICIES_PATH)
    # The watch from the old version was answered (its stream: an ERROR event, 410)...
    gone = [
        r
        for r in requests
        if r.verb == "watch" and r.query["resourceVersion"] == version and r.code == 200
    ]
    assert gone, [(r.verb, r.query.get("resourceVersion"), r.code) for r in requests]
    [relisted] = [r for r in requests if r.verb == "list"]
    # ... and the LIST came at once, not after the 2 s pause of a failure.
    assert relisted.received >= gone[-1].received
    assert (relisted.received - gone[-1].done).total_seconds() < 1.0
    # The loop watches again from the new LIST's version, and the pause is reset.
    wait_until(
        lambda: any(
            w.verb == "watch" and int(w.query["resourceVersion"]) > int(version)
            for w in agent_requests(
                control_plane, restarted, POLICIES_PATH, stage="ResponseStarted"
            )
        ),
        message="a watch from the new LIST",
    )
    assert loop.backoff.delay == 0.0
    assert api_errors(metrics, "watch policies") >= 1  # the outage itself was counted


def test_failures_pause_doubling_up_to_the_cap_and_are_counted(
    kube: Kube, audit: AuditLog, control_plane: ControlPlane, agent_api: Any, run_loop: Any
) -> None:
    api = agent_api("lw-backoff")
    metrics = AgentMetrics()
    loop = ListWatch(
        api,
        PODS_PATH,
        on_list=Recorder().on_list,
        on_event=Recorder().on_event,
        operation="watch pods",
        field_selector="spec.bogus=lw-backoff",  # the server refuses it: 400, every time
        metrics=metrics,
        backoff=Backoff(initial=0.25, maximum=1.0),
    )
    start = audit.mark()
    stop_thread = run_loop(loop)
    wait_until(
        lambda: len(agent_requests(control_plane, start, PODS_PATH)) >= 6,
        timeout=20,
        message="six LISTs",
    )
    lists = agent_requests(control_plane, start, PODS_PATH)
    assert {(r.verb, r.code) for r in lists} == {("list", 400)}
    gaps = [(b.received - a.done).total_seconds() for a, b in itertools.pairwise(lists)]
    for gap, pause in zip(gaps, [0.25, 0.5, 1.0, 1.0, 1.0], strict=False):
        assert pause * 0.9 <= gap <= pause + 0.5, gaps
    assert loop.lists == 0 and loop.version is None
    wait_until(
        lambda: api_errors(metrics, "watch pods") >= len(lists),
        message="every failure counted",
    )
    assert stop_thread.is_alive()  # it keeps trying


def test_the_policy_feed_lists_again_every_relist_seconds(
    kube: Kube, audit: AuditLog, control_plane: ControlPlane, agent_api: Any, run_loop: Any
) -> None:
    api = agent_api("lw-relist")
    kube.create_object(POLICIES, policy("one"))
    policies = ClusterPolicies(None)
    loop = policy_feed(api, policies, relist_seconds=2)
    start = audit.mark()
    run_loop(loop)
    wait_until(lambda: loop.lists >= 3, timeout=15, message="three LISTs")
    requests = agent_requests(control_plane, start, POLICIES_PATH)
    lists = [r for r in requests if r.verb == "list"]
    watches = [r for r in requests if r.verb == "watch"]
    assert len(lists) >= 3
    # Between LISTs the watch is open; the server ends it when the next LIST is due.
    assert watches and all(int(w.query["timeoutSeconds"]) <= 2 for w in watches)
    for a, b in itertools.pairwise(lists):
        assert 1.5 <= (b.received - a.received).total_seconds() <= 4.0
    current = policies()
    assert current is not None and [p.name for p in current] == ["one"]


def test_stopping_ends_an_open_watch_at_once(kube: Kube, audit: AuditLog, agent_api: Any) -> None:
    api = agent_api("lw-stop")
    seen = Recorder()
    loop = ListWatch(
        api,
        NODES_PATH,
        on_list=seen.on_list,
        on_event=seen.on_event,
        operation="watch node",
        field_selector="metadata.name=lw-nobody",  # a quiet watch: no event ends it
        watch_timeout=300,
    )
    start = audit.mark()
    stop = threading.Event()
    thread = loop.start(stop)
    try:
        audit.wait_for_watch("v1/nodes", user=AGENT_USER, since=start)
    finally:
        stop.set()
        loop.interrupt()
        thread.join(5)
    assert not thread.is_alive(), "the loop waited for the server's timeout"
    assert seen.lists == [[]] and seen.events == []
