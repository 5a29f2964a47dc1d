"""The controller against the API emulator: validation, roll-up, orphan reports, quiet.

The controller runs as it does in a cluster (kopf in its own thread, the official
client for status patches and deletes); the emulator records every request.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from emulator import KubeEmulator, api_client_for, wait_until

from nodemem.controller.operator import Controller, ControllerSettings, run_in_thread
from nodemem.kube import kopf_login, load_client_config
from samples import report_status

POLICIES = "nodemem.dev/v1alpha1/nodememorypolicies"
REPORTS = "nodemem.dev/v1alpha1/nodememoryreports"
NODES = "v1/nodes"
GiB = 1 << 30


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


def put_report(kube: KubeEmulator, name: str, status: dict[str, Any]) -> None:
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


def status_of(kube: KubeEmulator, name: str = "shm") -> dict[str, Any]:
    obj = kube.get_object(POLICIES, name)
    assert obj is not None
    return obj.get("status") or {}


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions", [])}


@pytest.fixture
def controller(kube: KubeEmulator, kubeconfig) -> Iterator[Controller]:
    configuration = load_client_config(str(kubeconfig))
    api = api_client_for(configuration.host)
    ctl = Controller(api, ControllerSettings(interval=0.05, orphan_grace=3600))
    thread, ready, stop = run_in_thread(ctl, kopf_login(configuration))
    try:
        assert ready.wait(10), "kopf did not start"
        kube.wait_for_watches(POLICIES)
        kube.wait_for_watches(NODES)
        kube.wait_for_watches(REPORTS)
        yield ctl
    finally:
        stop()
        thread.join(10)
        api.close()


@pytest.fixture
def cluster(kube: KubeEmulator) -> Callable[[], None]:
    """Three web nodes (one without a report yet) and a db node."""

    def build() -> None:
        for name, pool in (("web-1", "web"), ("web-2", "web"), ("web-3", "web"), ("db-1", "db")):
            kube.create_object(NODES, node(name, pool=pool))
        put_report(kube, "web-1", report_status(1, unaccounted=2 * GiB))
        put_report(kube, "web-2", report_status(1, state="Refused"))
        put_report(kube, "db-1", report_status(1))

    return build


def test_valid_policy_is_accepted_and_rolled_up(kube, cluster, controller) -> None:
    cluster()
    kube.create_object(POLICIES, policy())
    # Nodes, reports and policies arrive on separate watches: a first roll-up may have
    # matched the nodes before it has seen every report. Wait for the whole picture.
    expected = {"matched": 3, "applied": 1, "failed": 1, "pending": 1}
    wait_until(lambda: status_of(kube).get("nodes") == expected, message="roll-up")
    status = status_of(kube)
    assert status["observedGeneration"] == 1
    assert [f["node"] for f in status["failures"]] == ["web-2"]
    assert status["shmem"]["unaccountedBytes"] == 2 * GiB
    assert status["shmem"]["nodesOverThreshold"] == 1
    assert conditions(status) == {"Accepted": "True", "Applied": "False", "Degraded": "True"}


def test_invalid_regex_is_not_accepted_with_the_field_named(kube, controller) -> None:
    kube.create_object(
        POLICIES, policy(oom=[{"name": "x", "match": {"comm": "(("}, "oomScoreAdj": 5}])
    )
    wait_until(lambda: "Accepted" in conditions(status_of(kube)), message="Accepted")
    accepted = next(c for c in status_of(kube)["conditions"] if c["type"] == "Accepted")
    assert accepted["status"] == "False"
    assert accepted["message"].startswith("spec.oom[0].match.comm: invalid regex")


def test_report_update_changes_the_rollup(kube, cluster, controller) -> None:
    cluster()
    kube.create_object(POLICIES, policy())
    wait_until(lambda: status_of(kube).get("nodes", {}).get("failed") == 1, message="roll-up")
    put_report(kube, "web-2", report_status(1))  # the refusal is gone
    put_report(kube, "web-3", report_status(1))  # the third node reports
    wait_until(lambda: status_of(kube)["nodes"]["applied"] == 3, message="all applied")
    assert conditions(status_of(kube)) == {
        "Accepted": "True",
        "Applied": "True",
        "Degraded": "False",
    }


def test_deleting_a_node_deletes_its_report(kube, cluster, controller) -> None:
    cluster()
    kube.delete_object(NODES, "web-1")
    wait_until(lambda: kube.get_object(REPORTS, "web-1") is None, message="report deleted")
    assert kube.get_object(REPORTS, "web-2") is not None


def test_quiet_world_no_writes_and_never_to_nodes_or_reports(kube, cluster, controller) -> None:
    start = kube.mark()
    cluster()
    kube.create_object(POLICIES, policy())
    wait_until(lambda: status_of(kube).get("nodes", {}).get("matched") == 3, message="roll-up")

    def quiet_round(value: str) -> None:
        """Change something no status depends on, and wait for the round it causes."""
        rounds = controller.rounds
        kube.patch_object(NODES, "db-1", {"metadata": {"annotations": {"touched": value}}})
        wait_until(lambda: controller.rounds > rounds, message="a roll-up round")

    quiet_round("once")  # lets writes still in flight from the start land first
    writes_before = controller.status_writes
    settled = kube.mark()
    quiet_round("twice")
    assert controller.status_writes == writes_before
    assert kube.count(since=settled, verb=("patch", "update"), resource=POLICIES) == 0
    # The test's own writes go in-process and are not recorded: every recorded write is
    # the controller's. It wrote policy status only: nothing to nodes or reports.
    assert kube.writes(since=start, resource=NODES) == []
    assert kube.writes(since=start, resource=REPORTS) == []
    assert {r.plural for r in kube.writes(since=start)} <= {"nodememorypolicies"}


def test_controller_command_rolls_up_and_stops_on_sigterm(kube, kubeconfig, cluster) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cluster()
    kube.create_object(POLICIES, policy())
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nodemem.cli",
            "controller",
            "--kubeconfig",
            str(kubeconfig),
            "--health-port",
            str(port),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        wait_until(
            lambda: status_of(kube).get("nodes", {}).get("matched") == 3,
            message="roll-up by the command",
            timeout=30,
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(healthy, message="liveness endpoint")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stderr is not None
    assert "Traceback" not in process.stderr.read()
