"""The controller against the real control plane: validation, roll-up, orphan reports, quiet.

The controller runs as it does in a cluster: kopf in its own thread, the official client
for status patches and deletes, authenticated with a token of the chart's controller
ServiceAccount, so the chart's RBAC decides what it may do. The test sets up Nodes,
reports and policies as the admin; the API server's audit log says who wrote what.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from restclient import AuditEvent, AuditLog, Kube, wait_until

from conftest import CONTROLLER_USER, kubectl
from nodemem.controller.operator import Controller, ControllerSettings, run_in_thread
from nodemem.kube import kopf_login, load_client_config
from samples import report_status

POLICIES = "nodemem.dev/v1alpha1/nodememorypolicies"
REPORTS = "nodemem.dev/v1alpha1/nodememoryreports"
NODES = "v1/nodes"
GiB = 1 << 30
TIMEOUT = 30.0  # the real server and kopf on a loaded 2-core machine
# kube-controller-manager: its shared informers watch as itself, its controllers write
# with their own ServiceAccounts (--use-service-account-credentials).
KCM_USER = "system:kube-controller-manager"
GC_USER = "system:serviceaccount:kube-system:generic-garbage-collector"


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def policy(name: str = "shm", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"pool": "web"}},
            "tmpfs": [{"path": "/dev/shm", "size": "1Gi"}],
            "shmem": {"unaccountedThreshold": "1Gi"},
            **spec,
        },
    }


def put_report(
    kube: Kube, name: str, status: dict[str, Any], *, owner: dict[str, Any] | None = None
) -> None:
    """Create the report when missing (owned by ``owner``, a Node, as the agent does when
    it knows its Node's uid), then write its status."""
    if kube.get_object(REPORTS, name) is None:
        metadata: dict[str, Any] = {"name": name}
        if owner is not None:
            metadata["ownerReferences"] = [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": owner["metadata"]["name"],
                    "uid": owner["metadata"]["uid"],
                }
            ]
        kube.create_object(
            REPORTS,
            {
                "apiVersion": "nodemem.dev/v1alpha1",
                "kind": "NodeMemoryReport",
                "metadata": metadata,
            },
        )
    kube.patch_object(REPORTS, name, {"status": status}, subresource="status")


def status_of(kube: Kube, name: str = "shm") -> dict[str, Any]:
    obj = kube.get_object(POLICIES, name)
    assert obj is not None
    return obj.get("status") or {}


def nodes_of(kube: Kube, name: str = "shm") -> dict[str, Any]:
    nodes: dict[str, Any] = status_of(kube, name).get("nodes", {})
    return nodes


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions", [])}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def controller_kubeconfig(controller_token: str, kubeconfig_for_token: Callable[[str], Any]) -> str:
    return str(kubeconfig_for_token(controller_token))


@pytest.fixture
def start_controller(
    kube: Kube, audit: AuditLog, controller_kubeconfig: str
) -> Iterator[Callable[..., Controller]]:
    """Start the controller as the controller ServiceAccount; returns once its three
    watches are open. Stopped at teardown (before ``kube`` cleans up)."""
    running: list[tuple[Any, Callable[[], None], k8s.ApiClient]] = []

    def start(orphan_grace: float = 3600.0) -> Controller:
        mark = audit.mark()
        configuration = load_client_config(controller_kubeconfig)
        api = k8s.ApiClient(configuration)
        ctl = Controller(api, ControllerSettings(interval=0.05, orphan_grace=orphan_grace))
        thread, ready, stop = run_in_thread(ctl, kopf_login(configuration))
        running.append((thread, stop, api))
        assert ready.wait(TIMEOUT), "kopf did not start"
        for resource in (POLICIES, NODES, REPORTS):
            audit.wait_for_watch(resource, user=CONTROLLER_USER, since=mark, timeout=TIMEOUT)
        return ctl

    try:
        yield start
    finally:
        for thread, stop, api in running:
            stop()
            thread.join(TIMEOUT)
            api.close()
        assert not any(thread.is_alive() for thread, _, _ in running), "kopf did not stop"


@pytest.fixture
def controller(start_controller: Callable[..., Controller]) -> Controller:
    return start_controller()


@pytest.fixture
def cluster(kube: Kube) -> Callable[[], None]:
    """Three web nodes (one without a report yet) and a db node."""

    def build() -> None:
        for name, pool in (("web-1", "web"), ("web-2", "web"), ("web-3", "web"), ("db-1", "db")):
            kube.create_object(NODES, node(name, pool=pool))
        put_report(kube, "web-1", report_status(1, unaccounted=2 * GiB))
        put_report(kube, "web-2", report_status(1, state="Refused"))
        put_report(kube, "db-1", report_status(1))

    return build


def test_valid_policy_is_accepted_and_rolled_up(kube, audit, cluster, controller) -> None:
    mark = audit.mark()
    cluster()
    kube.create_object(POLICIES, policy())
    # Nodes, reports and policies arrive on separate watches: a first roll-up may have
    # matched the nodes before it has seen every report. Wait for the whole picture.
    expected = {"matched": 3, "applied": 1, "failed": 1, "pending": 1}
    wait_until(lambda: nodes_of(kube) == expected, timeout=TIMEOUT, message="roll-up")
    status = status_of(kube)
    assert status["observedGeneration"] == 1
    assert [f["node"] for f in status["failures"]] == ["web-2"]
    assert status["shmem"]["unaccountedBytes"] == 2 * GiB
    assert status["shmem"]["nodesOverThreshold"] == 1
    assert conditions(status) == {"Accepted": "True", "Applied": "False", "Degraded": "True"}
    # The server took every status patch the controller sent (none refused by the schema).
    patches = audit.writes(since=mark, user=CONTROLLER_USER, resource=POLICIES)
    assert patches and all(p.verb == "patch" and p.subresource == "status" for p in patches)
    assert [p.code for p in patches if p.code != 200] == []


def test_invalid_regex_is_not_accepted_with_the_field_named(kube, controller) -> None:
    kube.create_object(
        POLICIES, policy(oom=[{"name": "x", "match": {"comm": "(("}, "oomScoreAdj": 5}])
    )
    wait_until(
        lambda: "Accepted" in conditions(status_of(kube)), timeout=TIMEOUT, message="Accepted"
    )
    accepted = next(c for c in status_of(kube)["conditions"] if c["type"] == "Accepted")
    assert accepted["status"] == "False"
    assert accepted["message"].startswith("spec.oom[0].match.comm: invalid regex")


def test_report_update_changes_the_rollup(kube, cluster, controller) -> None:
    cluster()
    kube.create_object(POLICIES, policy())
    wait_until(lambda: nodes_of(kube).get("failed") == 1, timeout=TIMEOUT, message="roll-up")
    put_report(kube, "web-2", report_status(1))  # the refusal is gone
    put_report(kube, "web-3", report_status(1))  # the third node reports
    wait_until(lambda: nodes_of(kube).get("applied") == 3, timeout=TIMEOUT, message="all applied")
    assert conditions(status_of(kube)) == {
        "Accepted": "True",
        "Applied": "True",
        "Degraded": "False",
    }


def test_kubectl_get_nmp_shows_the_rollup_in_its_columns(
    control_plane, kube, cluster, controller
) -> None:
    cluster()
    kube.create_object(POLICIES, policy())
    wait_until(
        lambda: nodes_of(kube).get("pending") == 1 and nodes_of(kube).get("failed") == 1,
        timeout=TIMEOUT,
        message="roll-up",
    )
    header, *rows = kubectl(control_plane, "get", "nmp").splitlines()
    assert header.split() == [
        "NAME",
        "PRIORITY",
        "MATCHED",
        "APPLIED",
        "FAILED",
        "UNACCOUNTED",
        "AGE",
    ]
    assert len(rows) == 1
    assert rows[0].split()[:6] == ["shm", "0", "3", "1", "1", str(2 * GiB)]


def logged_report_writes(audit: AuditLog, since: int) -> list[AuditEvent]:
    """The writes to reports since ``since``, once the delete just seen is logged."""
    wait_until(
        lambda: audit.writes(since=since, resource=REPORTS),
        timeout=TIMEOUT,
        message="the report's deletion in the audit log",
    )
    return audit.writes(since=since, resource=REPORTS)


def test_controller_deletes_the_unowned_report_of_a_deleted_node(
    kube, audit, cluster, controller
) -> None:
    cluster()  # reports created without ownerReferences: the garbage collector ignores them
    wait_until(
        lambda: controller.state is not None and "web-1" in controller.state.reports,
        timeout=TIMEOUT,
        message="the controller to see web-1's report",
    )
    mark = audit.mark()
    kube.delete_object(NODES, "web-1")
    wait_until(
        lambda: kube.get_object(REPORTS, "web-1") is None, timeout=TIMEOUT, message="report deleted"
    )
    deletes = logged_report_writes(audit, mark)
    assert [(d.user, d.verb, d.name, d.code) for d in deletes] == [
        (CONTROLLER_USER, "delete", "web-1", 200)
    ]
    assert kube.get_object(REPORTS, "web-2") is not None
    assert kube.get_object(REPORTS, "db-1") is not None


def test_controller_collects_a_report_whose_node_went_unseen_after_the_grace(
    kube, audit, cluster, start_controller
) -> None:
    cluster()
    kube.delete_object(NODES, "web-1")  # while no controller runs: it never sees the deletion
    grace = 3.0
    mark = audit.mark()
    started = time.monotonic()
    ctl = start_controller(orphan_grace=grace)
    wait_until(lambda: ctl.rounds > 0, timeout=TIMEOUT, message="a first roll-up round")

    # Nothing changes after the start: the controller must wake at the end of the grace
    # by itself (a quiet cluster sends no event).
    wait_until(
        lambda: kube.get_object(REPORTS, "web-1") is None,
        timeout=TIMEOUT,
        message="the orphan report collected in a quiet cluster",
    )
    assert time.monotonic() - started >= grace  # not before the grace: at start streams fill
    deletes = logged_report_writes(audit, mark)
    assert [(d.user, d.verb, d.name, d.code) for d in deletes] == [
        (CONTROLLER_USER, "delete", "web-1", 200)
    ]
    assert kube.get_object(REPORTS, "web-2") is not None
    assert kube.get_object(REPORTS, "db-1") is not None


def test_garbage_collector_deletes_a_node_owned_report_with_its_node(kube, audit) -> None:
    # The agent owns its report by its Node (operator/nodemem/agent/report_writer.py): then
    # kube-controller-manager's garbage collector deletes it, no nodemem controller runs.
    # Its monitors pick up new CRDs at their discovery resync (every 30 s).
    # (No wait for its watch here: the report deletion below allows for the resync.)
    owner = kube.create_object(NODES, node("web-1", pool="web"))
    kube.create_object(NODES, node("web-2", pool="web"))
    put_report(kube, "web-1", report_status(1), owner=owner)
    put_report(kube, "web-2", report_status(1), owner=kube.get_object(NODES, "web-2"))
    mark = audit.mark()
    kube.delete_object(NODES, "web-1")
    wait_until(
        lambda: kube.get_object(REPORTS, "web-1") is None,
        timeout=120,  # the collector's monitors pick up new kinds at a 30 s discovery resync
        message="report collected",
    )
    deletes = logged_report_writes(audit, mark)
    assert [(d.user, d.verb, d.name) for d in deletes] == [(GC_USER, "delete", "web-1")]
    assert kube.get_object(REPORTS, "web-2") is not None


def test_quiet_world_no_writes_and_never_to_nodes_or_reports(
    kube, audit, cluster, controller
) -> None:
    start = audit.mark()
    cluster()
    kube.create_object(POLICIES, policy())
    wait_until(lambda: nodes_of(kube).get("matched") == 3, timeout=TIMEOUT, message="roll-up")

    def quiet_round(value: str) -> None:
        """Change something no status depends on, and wait for the round it causes."""
        rounds = controller.rounds
        kube.patch_object(NODES, "db-1", {"metadata": {"annotations": {"touched": value}}})
        wait_until(lambda: controller.rounds > rounds, timeout=TIMEOUT, message="a roll-up round")

    quiet_round("once")  # lets writes still in flight from the start land first
    writes_before = controller.status_writes
    settled = audit.mark()
    quiet_round("twice")
    assert controller.status_writes == writes_before
    assert audit.writes(since=settled, user=CONTROLLER_USER) == []
    # Every Node has its report: no orphan to delete, so the controller wrote policy
    # status only, nothing to nodes or reports.
    writes = audit.writes(since=start, user=CONTROLLER_USER)
    assert writes
    assert {(w.resource, w.verb, w.subresource) for w in writes} == {(POLICIES, "patch", "status")}
    assert len(writes) == controller.status_writes


def test_controller_survives_an_api_outage(control_plane, kube, audit, cluster, controller) -> None:
    cluster()
    kube.create_object(POLICIES, policy())
    wait_until(lambda: nodes_of(kube).get("failed") == 1, timeout=TIMEOUT, message="roll-up")
    control_plane.stop_apiserver()
    try:
        mark = audit.mark()  # the server is down: nothing is logged until it is back
        time.sleep(3)  # the outage itself: the controller's watches and loop see it fail
    finally:
        control_plane.start_apiserver()
    for resource in (POLICIES, NODES, REPORTS):
        audit.wait_for_watch(resource, user=CONTROLLER_USER, since=mark, timeout=TIMEOUT)
    put_report(kube, "web-2", report_status(1))  # the refusal is gone
    wait_until(
        lambda: nodes_of(kube).get("failed") == 0 and nodes_of(kube).get("applied") == 2,
        timeout=TIMEOUT,
        message="roll-up after the outage",
    )
    assert conditions(status_of(kube))["Degraded"] == "False"


def test_controller_command_rolls_up_and_stops_on_sigterm(
    kube, audit, cluster, controller_kubeconfig, tmp_path
) -> None:
    port = free_port()
    log = tmp_path / "controller.log"
    cluster()
    kube.create_object(POLICIES, policy())
    mark = audit.mark()
    with log.open("w") as output:  # a file, not a pipe nobody reads while it runs
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nodemem.cli",
                "controller",
                "--kubeconfig",
                controller_kubeconfig,
                "--health-port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=output,
            env={**os.environ},
        )
    try:
        wait_until(
            lambda: nodes_of(kube).get("matched") == 3,
            message="roll-up by the command",
            timeout=TIMEOUT,
        )
        patches = audit.writes(since=mark, user=CONTROLLER_USER, resource=POLICIES)
        assert patches and {(p.verb, p.subresource, p.code) for p in patches} == {
            ("patch", "status", 200)
        }

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(healthy, timeout=TIMEOUT, message="liveness endpoint")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in log.read_text()
