"""Watch faults of the real kube-apiserver: 410 Gone after compaction, and bookmarks.

- 410: while a client's watches are open, the objects change many times; then etcd is
  compacted at its current revision and kube-apiserver restarted (its watch cache is
  rebuilt from the compacted store). The client's reconnect resumes from the version it
  had, older than anything the new server keeps: the server answers it with an ERROR
  event of code 410 ("too old resource version"). The audit log shows that watch
  (answered at once) and the LIST the client sent next; a direct watch at the same
  version confirms the server's 410. Then a change made after the restart takes effect:
  the agent enforces a policy changed after it, the controller rolls up a report
  changed after it, the list-watch loop alone sees a pod bound after it.
- Bookmarks: the agent's list-watch loop asks for them, and resumes the next watch (the
  server ends each after the loop's timeoutSeconds) from a bookmark's version, newer
  than anything the loop was told of its own objects, without a LIST.

Every test restarts kube-apiserver of the session's control plane in a finally: the
next test finds it up.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from restclient import ApiError, AuditLog, Kube, resource_path, wait_until

from conftest import (
    AGENT_SA,
    AGENT_USER,
    CONTROLLER_USER,
    NAMESPACE,
    POLICIES,
    REPORTS,
    bound_pod,
    ensure_node,
)
from nodemem.agent.kubeapi import RawApi
from nodemem.agent.listwatch import ListWatch
from nodemem.agent.main import ClusterAgent, ClusterAgentOptions
from nodemem.controller.operator import Controller, ControllerSettings, run_in_thread
from nodemem.kube import kopf_login, load_client_config
from samples import FakeWallClock, report_status

NODES = "v1/nodes"
PODS = "v1/pods"
MiB = 1 << 20
TIMEOUT = 60.0  # kube-apiserver restarts and clients back off, on a loaded 2-core machine
WATCH_SECONDS = 5  # the loop's timeoutSeconds in the bookmark test: a bookmark at 3 s
ANSWERED_AT_ONCE = 5.0  # seconds: a watch answered by an ERROR event, not one that ran


# --- the audit log: who watched from which version, and when --------------------------


@dataclass(frozen=True)
class Call:
    """One completed request of the audit log, in the log's order."""

    index: int
    verb: str
    uri: str
    code: int | None
    received: datetime
    seconds: float  # from received to complete

    @property
    def version(self) -> int | None:
        """The resourceVersion asked for (an etcd revision on this server), if any."""
        values = urllib.parse.parse_qs(urllib.parse.urlsplit(self.uri).query).get("resourceVersion")
        return int(values[0]) if values and values[0] else None


def calls(audit: AuditLog, *, since: int, user: str, resource: str, verb: str) -> list[Call]:
    """The completed `verb` requests of `user` on `resource` ("v1/pods") after `since`."""
    return [
        Call(
            index=index,
            verb=verb,
            uri=event.uri,
            code=event.code,
            received=datetime.fromtimestamp(event.received, UTC),
            seconds=event.completed - event.received,
        )
        for index, event in enumerate(audit.events(since))
        if event.stage == "ResponseComplete"
        and event.verb == verb
        and event.user == user
        and event.resource == resource
        and not event.subresource
    ]


def watch_answer(plane: Any, resource: str, version: int) -> tuple[str, int | None, str]:
    """What the server answers a watch from `version` now (as the admin): the first
    event's type, its code and message for an ERROR (or the HTTP status of a refusal)."""
    query = urllib.parse.urlencode(
        {"watch": "true", "resourceVersion": str(version), "timeoutSeconds": "3"}
    )
    request = urllib.request.Request(f"{plane.url}{resource_path(resource)}?{query}")
    try:
        with urllib.request.urlopen(request, context=plane.ssl_context(), timeout=30) as response:
            line = response.readline()
    except urllib.error.HTTPError as error:
        body = json.loads(error.read() or b"{}")
        return "HTTP", error.code, str(body.get("message", ""))
    if not line:
        return "NONE", None, "the watch ended without an event"
    event = json.loads(line)
    obj = event.get("object") or {}
    return str(event["type"]), obj.get("code"), str(obj.get("message", ""))


def gone_then_listed(
    audit: AuditLog,
    *,
    since: int,
    restarted: datetime,
    compacted: int,
    user: str,
    resource: str,
) -> tuple[Call, Call] | None:
    """The first watch `user` sent to the restarted server on `resource` from a version
    from before the compaction, and the first LIST of `user` after it, once both are in
    the log."""
    watches = calls(audit, since=since, user=user, resource=resource, verb="watch")
    stale = [
        w
        for w in watches
        if w.received > restarted
        and w.version is not None
        and w.version <= compacted
        and w.code in (200, 410)
    ]
    if not stale:
        return None
    lists = calls(audit, since=since, user=user, resource=resource, verb="list")
    relisted = [c for c in lists if c.index > stale[0].index and c.code == 200]
    return (stale[0], relisted[0]) if relisted else None


def assert_gone_then_listed(
    audit: AuditLog,
    plane: Any,
    *,
    since: int,
    restarted: datetime,
    compacted: int,
    user: str,
    resource: str,
) -> None:
    """After the restart, `user` resumed its watch on `resource` from a version from
    before the compaction, the server answered it at once, `user` LISTed next; and the
    server says 410 for that version."""
    found: list[tuple[Call, Call]] = []

    def seen() -> bool:
        answer = gone_then_listed(
            audit,
            since=since,
            restarted=restarted,
            compacted=compacted,
            user=user,
            resource=resource,
        )
        if answer is not None:
            found.append(answer)
        return answer is not None

    wait_until(
        seen,
        timeout=TIMEOUT,
        interval=0.2,
        message=f"{user}: a watch on {resource} from before the compaction "
        f"(revision {compacted}), then a LIST",
    )
    gone, _listed = found[-1]
    assert gone.seconds < ANSWERED_AT_ONCE, f"the stale watch on {resource} ran {gone.seconds} s"
    kind, code, message = watch_answer(plane, resource, gone.version or 0)
    assert (kind, code) in (("ERROR", 410), ("HTTP", 410)), (kind, code, message)
    assert "too old resource version" in message, message


# --- the fault ---------------------------------------------------------------------------


def restart_after_compaction(plane: Any, kube: Kube) -> tuple[int, datetime]:
    """A write no client here watches (so that the revision compacted at is newer than
    every version a client was told of), etcd compacted at its current revision,
    kube-apiserver stopped and started again. Returns (the revision compacted at, a
    time after the old server stopped: every request received later went to the new
    one)."""
    bystander = kube.create_object(
        "v1/configmaps", {"metadata": {"generateName": "watch-recovery-"}}, namespace="default"
    )
    kube.delete_object("v1/configmaps", bystander["metadata"]["name"], namespace="default")
    compacted = plane.compact()
    try:
        plane.stop_apiserver()
        stopped = datetime.now(UTC)
    finally:
        plane.start_apiserver()
    served(kube)
    return compacted, stopped


def served(kube: Kube) -> None:
    """A restarted server answers 429 for a custom resource until its cache is filled."""

    def answers() -> bool:
        try:
            kube.list_objects(POLICIES)
            kube.list_objects(REPORTS)
        except ApiError as error:
            if error.status == 429:
                return False
            raise
        return True

    wait_until(answers, timeout=TIMEOUT, interval=0.2, message="the custom resources served")


def own_pods(kube: Kube, node: str) -> list[dict[str, Any]]:
    return kube.list_objects(PODS, namespace=NAMESPACE, fieldSelector=f"spec.nodeName={node}")


# --- the list-watch loop alone (no enforcement, no privilege) -------------------------


@dataclass
class PodFeed:
    """The loop as the agent runs it for its pods, with the agent's own credentials."""

    loop: ListWatch
    names: set[str]
    lock: threading.Lock


@pytest.fixture
def pod_feed(
    kube: Kube, agent_token: Callable[..., str], kubeconfig_for_token: Callable[[str], Path]
) -> Iterator[Callable[..., PodFeed]]:
    running: list[tuple[ListWatch, threading.Event, threading.Thread, k8s.ApiClient]] = []

    def start(node: str = "node-a", **options: Any) -> PodFeed:
        configuration = load_client_config(str(kubeconfig_for_token(agent_token(node))))
        api_client = k8s.ApiClient(configuration)
        names: set[str] = set()
        lock = threading.Lock()

        def on_list(items: list[dict[str, Any]]) -> None:
            with lock:
                names.clear()
                names.update(p["metadata"]["name"] for p in items)

        def on_event(kind: str, pod: dict[str, Any]) -> None:
            with lock:
                if kind == "DELETED":
                    names.discard(pod["metadata"]["name"])
                else:
                    names.add(pod["metadata"]["name"])

        loop = ListWatch(
            RawApi(api_client),
            "/api/v1/pods",
            on_list=on_list,
            on_event=on_event,
            operation="watch pods",
            field_selector=f"spec.nodeName={node}",
            **options,
        )
        stop = threading.Event()
        running.append((loop, stop, loop.start(stop), api_client))
        return PodFeed(loop, names, lock)

    try:
        yield start
    finally:
        for loop, stop, thread, api_client in running:
            stop.set()
            loop.interrupt()
            thread.join(TIMEOUT)
            api_client.close()
        assert not any(thread.is_alive() for _, _, thread, _ in running), "a feed did not stop"


def test_list_watch_resumes_from_a_bookmark_without_a_list(kube, audit, pod_feed) -> None:
    mark = audit.mark()
    feed = pod_feed(watch_timeout=WATCH_SECONDS)
    audit.wait_for_watch(PODS, user=AGENT_USER, since=mark, timeout=TIMEOUT)
    # Elsewhere, a pod on another node changes: the pods' resourceVersion moves on, and
    # nothing of it is this node's, so no event can tell the loop of it: a bookmark can.
    ensure_node(kube, "node-b")
    other = bound_pod(kube, "node-b", AGENT_SA)
    for step in range(3):
        other = kube.patch_object(
            PODS,
            other["metadata"]["name"],
            {"metadata": {"labels": {"step": str(step)}}},
            namespace=NAMESPACE,
        )
    moved = int(other["metadata"]["resourceVersion"])

    def resumed_past_it() -> bool:
        watches = calls(audit, since=mark, user=AGENT_USER, resource=PODS, verb="watch")
        return any(w.version is not None and w.version >= moved for w in watches)

    # The server ends a watch after WATCH_SECONDS, 2 s after its bookmark.
    wait_until(resumed_past_it, timeout=TIMEOUT, interval=0.2, message="a watch from a bookmark")
    # No pod of this node changed since: only a bookmark told the loop of `moved`.
    assert max(int(p["metadata"]["resourceVersion"]) for p in own_pods(kube, "node-a")) < moved
    listed = calls(audit, since=mark, user=AGENT_USER, resource=PODS, verb="list")
    assert len(listed) == 1, [c.uri for c in listed]  # the first one, before any watch
    assert feed.loop.lists == 1
    watches = calls(audit, since=mark, user=AGENT_USER, resource=PODS, verb="watch")
    assert all("allowWatchBookmarks=true" in w.uri for w in watches), [w.uri for w in watches]
    assert all(f"timeoutSeconds={WATCH_SECONDS}" in w.uri for w in watches)

    # The resumed watch delivers: a pod bound to this node now shows, still without a LIST.
    late = bound_pod(kube, "node-a", AGENT_SA)["metadata"]["name"]

    def seen() -> bool:
        with feed.lock:
            return late in feed.names

    wait_until(seen, timeout=TIMEOUT, message="the new pod through the resumed watch")
    assert len(calls(audit, since=mark, user=AGENT_USER, resource=PODS, verb="list")) == 1
    assert feed.loop.lists == 1


def test_list_watch_lists_again_after_410(kube, audit, control_plane, pod_feed) -> None:
    mark = audit.mark()
    feed = pod_feed()
    audit.wait_for_watch(PODS, user=AGENT_USER, since=mark, timeout=TIMEOUT)
    # Changes while the watch is open: a pod of this node, many times.
    pod = bound_pod(kube, "node-a", AGENT_SA)
    name = pod["metadata"]["name"]
    for step in range(8):
        pod = kube.patch_object(
            PODS, name, {"metadata": {"labels": {"step": str(step)}}}, namespace=NAMESPACE
        )

    def seen(pod_name: str) -> Callable[[], bool]:
        def check() -> bool:
            with feed.lock:
                return pod_name in feed.names

        return check

    wait_until(seen(name), timeout=TIMEOUT, message="the pod through the watch")
    wait_until(
        lambda: int(feed.loop.version or 0) >= int(pod["metadata"]["resourceVersion"]),
        timeout=TIMEOUT,
        message="the loop at the last change's version",
    )
    assert feed.loop.lists == 1

    compacted, restarted = restart_after_compaction(control_plane, kube)
    late = bound_pod(kube, "node-a", AGENT_SA)["metadata"]["name"]
    wait_until(seen(late), timeout=TIMEOUT, message="a pod bound after the restart")

    assert_gone_then_listed(
        audit,
        control_plane,
        since=mark,
        restarted=restarted,
        compacted=compacted,
        user=AGENT_USER,
        resource=PODS,
    )
    assert feed.loop.lists == 2


# --- the agent (enforcing on this host) -----------------------------------------------


def size_of(point: Path) -> int:
    st = os.statvfs(point)
    return st.f_blocks * st.f_frsize


def tmpfs_policy(point: Path, size: str) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "watch-recovery"},
        "spec": {
            "nodeSelector": {"matchLabels": {"pool": "web"}},
            "tmpfs": [{"path": str(point), "size": size}],
        },
    }


@pytest.fixture
def start_agent(
    agent_token: Callable[..., str], kubeconfig_for_token: Callable[[str], Path], tmp_path: Path
) -> Iterator[Callable[[str], ClusterAgent]]:
    running: list[tuple[ClusterAgent, threading.Thread]] = []

    def start(node: str) -> ClusterAgent:
        kubeconfig = kubeconfig_for_token(agent_token(node, pool="web"))
        options = ClusterAgentOptions(
            node_name=node,
            state_dir=tmp_path / f"state-{node}",
            metrics_port=None,
            resync_seconds=0.3,
            heartbeat_seconds=3600,
            relist_seconds=3600,  # no periodic LIST of policies: every LIST here is a recovery
            poll_seconds=0.05,
            wall_clock=FakeWallClock(),
        )
        agent = ClusterAgent(options, load_client_config(str(kubeconfig)))
        thread = threading.Thread(target=agent.run, name=f"agent-{node}", daemon=True)
        thread.start()
        running.append((agent, thread))
        return agent

    try:
        yield start
    finally:
        for agent, thread in running:
            agent.stop.set()
            thread.join(TIMEOUT)
        assert not any(thread.is_alive() for _, thread in running), "an agent did not stop"


@pytest.mark.privileged
def test_agent_lists_again_after_410_and_enforces_a_change_made_after(
    kube, audit, control_plane, mount_tmpfs, start_agent
) -> None:
    point = mount_tmpfs(options="size=64m")
    kube.create_object(POLICIES, tmpfs_policy(point, "16Mi"))
    mark = audit.mark()
    start_agent("node-a")
    wait_until(lambda: size_of(point) == 16 * MiB, timeout=TIMEOUT, message="tmpfs limited")
    for resource in (POLICIES, NODES, PODS):
        audit.wait_for_watch(resource, user=AGENT_USER, since=mark, timeout=TIMEOUT)

    # Changes while the watches are open: the policy, the Node and the agent's pod.
    for size in (17, 18, 19, 20):
        kube.patch_object(
            POLICIES,
            "watch-recovery",
            {"spec": {"tmpfs": [{"path": str(point), "size": f"{size}Mi"}]}},
        )
    [agent_pod] = own_pods(kube, "node-a")
    for step in range(4):
        kube.patch_object(NODES, "node-a", {"metadata": {"labels": {"step": str(step)}}})
        kube.patch_object(
            PODS,
            agent_pod["metadata"]["name"],
            {"metadata": {"labels": {"step": str(step)}}},
            namespace=NAMESPACE,
        )
    wait_until(lambda: size_of(point) == 20 * MiB, timeout=TIMEOUT, message="the last size")

    compacted, restarted = restart_after_compaction(control_plane, kube)

    # A policy change made after the restart is enforced...
    kube.patch_object(
        POLICIES, "watch-recovery", {"spec": {"tmpfs": [{"path": str(point), "size": "24Mi"}]}}
    )
    wait_until(
        lambda: size_of(point) == 24 * MiB,
        timeout=TIMEOUT,
        message="the size set after the restart",
    )
    # ...and so is a Node change: out of the pool, the tmpfs is given back its size.
    kube.patch_object(NODES, "node-a", {"metadata": {"labels": {"pool": "db"}}})
    wait_until(
        lambda: size_of(point) == 64 * MiB, timeout=TIMEOUT, message="restored after the restart"
    )

    for resource in (POLICIES, NODES, PODS):
        assert_gone_then_listed(
            audit,
            control_plane,
            since=mark,
            restarted=restarted,
            compacted=compacted,
            user=AGENT_USER,
            resource=resource,
        )
    assert audit.writes(since=mark, user=AGENT_USER, resource=POLICIES) == []


# --- the controller ---------------------------------------------------------------------


@pytest.fixture
def start_controller(
    kube: Kube, audit: AuditLog, controller_token: str, kubeconfig_for_token: Callable[[str], Path]
) -> Iterator[Callable[[], Controller]]:
    running: list[tuple[threading.Thread, Callable[[], None], k8s.ApiClient]] = []

    def start() -> Controller:
        mark = audit.mark()
        configuration = load_client_config(str(kubeconfig_for_token(controller_token)))
        api = k8s.ApiClient(configuration)
        controller = Controller(api, ControllerSettings(interval=0.05, orphan_grace=3600))
        thread, ready, stop = run_in_thread(controller, kopf_login(configuration))
        running.append((thread, stop, api))
        assert ready.wait(TIMEOUT), "kopf did not start"
        for resource in (POLICIES, NODES, REPORTS):
            audit.wait_for_watch(resource, user=CONTROLLER_USER, since=mark, timeout=TIMEOUT)
        return controller

    try:
        yield start
    finally:
        for thread, stop, api in running:
            stop()
            thread.join(TIMEOUT)
            api.close()
        assert not any(thread.is_alive() for thread, _, _ in running), "kopf did not stop"


def put_report(kube: Kube, name: str, status: dict[str, Any]) -> None:
    if kube.get_object(REPORTS, name) is None:
        kube.create_object(
            REPORTS,
            {
                "apiVersion": "nodemem.dev/v1alpha1",
                "kind": "NodeMemoryReport",
                "metadata": {"name": name},
            },
        )
    kube.patch_object(REPORTS, name, {"status": status}, subresource="status")


def rolled_up(kube: Kube) -> dict[str, Any]:
    obj = kube.get_object(POLICIES, "shm") or {}
    nodes: dict[str, Any] = (obj.get("status") or {}).get("nodes", {})
    return nodes


def test_controller_lists_again_after_410_and_rolls_up_a_report_changed_after(
    kube, audit, control_plane, start_controller
) -> None:
    for name in ("web-1", "web-2"):
        kube.create_object(NODES, {"metadata": {"name": name, "labels": {"pool": "web"}}})
    kube.create_object(
        POLICIES,
        {
            "apiVersion": "nodemem.dev/v1alpha1",
            "kind": "NodeMemoryPolicy",
            "metadata": {"name": "shm"},
            "spec": {
                "nodeSelector": {"matchLabels": {"pool": "web"}},
                "tmpfs": [{"path": "/dev/shm", "size": "1Gi"}],
            },
        },
    )
    put_report(kube, "web-1", report_status(1))
    mark = audit.mark()
    start_controller()
    expected = {"matched": 2, "applied": 1, "failed": 0, "pending": 1}
    wait_until(lambda: rolled_up(kube) == expected, timeout=TIMEOUT, message="the roll-up")

    # Changes while the watches are open: web-1's report, the Nodes, the policy.
    for step in range(5):
        put_report(kube, "web-1", report_status(1, unaccounted=step * MiB))
        kube.patch_object(NODES, "web-2", {"metadata": {"labels": {"step": str(step)}}})
        kube.patch_object(POLICIES, "shm", {"metadata": {"labels": {"step": str(step)}}})
    put_report(kube, "web-2", report_status(1, state="Refused"))
    failed = {"matched": 2, "applied": 1, "failed": 1, "pending": 0}
    wait_until(lambda: rolled_up(kube) == failed, timeout=TIMEOUT, message="web-2's refusal")

    compacted, restarted = restart_after_compaction(control_plane, kube)

    # Changes after the restart, one through each watch: the policy's spec (generation
    # 2), a new Node, the reports at generation 2.
    kube.patch_object(POLICIES, "shm", {"spec": {"tmpfs": [{"path": "/dev/shm", "size": "2Gi"}]}})
    kube.create_object(NODES, {"metadata": {"name": "web-3", "labels": {"pool": "web"}}})
    for name in ("web-1", "web-2"):
        put_report(kube, name, report_status(2))
    after = {"matched": 3, "applied": 2, "failed": 0, "pending": 1}
    wait_until(
        lambda: rolled_up(kube) == after, timeout=TIMEOUT, message="the roll-up after the restart"
    )
    status = (kube.get_object(POLICIES, "shm") or {}).get("status") or {}
    assert status.get("observedGeneration") == 2

    for resource in (POLICIES, NODES, REPORTS):
        assert_gone_then_listed(
            audit,
            control_plane,
            since=mark,
            restarted=restarted,
            compacted=compacted,
            user=CONTROLLER_USER,
            resource=resource,
        )
