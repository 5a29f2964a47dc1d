"""`nodemem agent` and `nodemem controller` as processes against the real server.

Each with its own ServiceAccount token (the agent's bound to a Pod on its Node): a
policy applied by the admin is enforced on this host, the agent's report is written, the
controller rolls it up into the policy's status, `kubectl get nmp,nmr` shows both, and
deleting the Node removes its report (the agent's report is owned by its Node).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from controlplane import ControlPlane, free_port
from restclient import AuditLog, Kube, wait_until

from conftest import AGENT_USER, POLICIES, REPORTS

pytestmark = pytest.mark.privileged

TIMEOUT = 60.0
MiB = 1 << 20


def size_of(point: Path) -> int:
    st = os.statvfs(point)
    return st.f_blocks * st.f_frsize


@pytest.fixture
def commands(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [sys.executable, "-m", "nodemem.cli", *args],
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    for name in ("agent", "controller"):
        log = tmp_path / f"{name}.log"
        if log.exists():
            assert "Traceback" not in log.read_text(), f"{name} log:\n{log.read_text()}"


def kubectl(plane: ControlPlane, *args: str) -> str:
    return subprocess.run(
        [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def status(kube: Kube, resource: str, name: str) -> dict[str, Any]:
    obj = kube.get_object(resource, name)
    return (obj or {}).get("status") or {}


def test_agent_and_controller_processes_enforce_report_and_roll_up(  # noqa: PLR0917 - fixtures
    control_plane: ControlPlane,
    kube: Kube,
    audit: AuditLog,
    agent_token: Callable[..., str],
    controller_token: str,
    kubeconfig_for_token: Callable[[str], Path],
    mount_tmpfs: Callable[..., Path],
    commands: Callable[..., subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    point = mount_tmpfs(options="size=64m")
    agent_config = kubeconfig_for_token(agent_token("node-e2e", pool="web"))
    controller_config = kubeconfig_for_token(controller_token)
    kube.create_object(
        POLICIES,
        {
            "apiVersion": "nodemem.dev/v1alpha1",
            "kind": "NodeMemoryPolicy",
            "metadata": {"name": "e2e"},
            "spec": {
                "nodeSelector": {"matchLabels": {"pool": "web"}},
                "tmpfs": [{"path": str(point), "size": "16Mi"}],
            },
        },
    )
    start = audit.mark()
    agent = commands(
        "agent",
        "agent",
        "--kubeconfig",
        str(agent_config),
        "--state-dir",
        str(tmp_path / "state"),
        "--metrics-port",
        str(free_port()),
        env={"NODE_NAME": "node-e2e"},
    )
    controller = commands(
        "controller",
        "controller",
        "--kubeconfig",
        str(controller_config),
        "--health-port",
        str(free_port()),
    )

    wait_until(lambda: size_of(point) == 16 * MiB, timeout=TIMEOUT, message="the tmpfs limited")
    wait_until(
        lambda: status(kube, POLICIES, "e2e").get("nodes", {}).get("applied") == 1,
        timeout=TIMEOUT,
        message="the policy status rolled up from the agent's report",
    )
    policy_status = status(kube, POLICIES, "e2e")
    assert policy_status["nodes"] == {"matched": 1, "applied": 1, "failed": 0, "pending": 0}
    conditions = {c["type"]: c["status"] for c in policy_status["conditions"]}
    assert conditions == {"Accepted": "True", "Applied": "True", "Degraded": "False"}
    [item] = [i for i in status(kube, REPORTS, "node-e2e")["tmpfs"] if i["path"] == str(point)]
    assert item["state"] == "Applied"

    rows = kubectl(control_plane, "get", "nmp,nmr", "--no-headers").splitlines()
    assert any(
        row.split()[:5] == ["nodememorypolicy.nodemem.dev/e2e", "0", "1", "1", "0"] for row in rows
    ), rows
    assert any(row.startswith("nodememoryreport.nodemem.dev/node-e2e ") for row in rows), rows

    # Every write of the agent was its own report or an Event; the controller's only
    # policy status.
    for event in audit.writes(since=start, user=AGENT_USER):
        assert event.plural in {"nodememoryreports", "events"}, event
        assert event.plural != "nodememoryreports" or event.name == "node-e2e", event

    # The Node goes: its report goes with it, the agent keeps running.
    kube.delete_object("v1/nodes", "node-e2e")
    wait_until(
        lambda: kube.get_object(REPORTS, "node-e2e") is None,
        timeout=TIMEOUT,
        message="the report deleted with its Node",
    )
    assert agent.poll() is None and controller.poll() is None
