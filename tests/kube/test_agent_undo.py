"""Undo in the cluster agent (issue 13.2), against the real control plane on this real
host: a deleted policy and a relabelled node put the tmpfs size and the adj back; an API
outage is not a deletion (nothing is restored until the API lists the policies again,
even when the policy was deleted while the agent was down and it restarted with
kube-apiserver stopped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import test_agent_cluster as cluster
from restclient import AuditLog, Kube, wait_until
from test_agent_cluster import NODES, TIMEOUT, MiB, adj, policy, size_of, spawn, token_

from conftest import AGENT_USER, POLICIES
from nodemem.api.status import NodeMemoryReportStatus

# The fixtures, shared.
agent_kubeconfig = cluster.agent_kubeconfig
start_agent = cluster.start_agent

pytestmark = pytest.mark.privileged


def record_writes(running: Any) -> list[tuple[list[str], list[str], bool]]:
    """Every status the agent's report writer is given from now on: (tmpfs states,
    oom restore states, whether it was written). A cycle's Restored lasts one cycle."""
    writer = running.cluster_agent.writer
    real = writer.write
    seen: list[tuple[list[str], list[str], bool]] = []

    def write(status: NodeMemoryReportStatus) -> bool:
        written: bool = real(status)
        restores = [r.state for r in status.oom.restores] if status.oom else []
        seen.append(([t.state for t in status.tmpfs], restores, written))
        return written

    writer.write = write
    return seen


def test_a_deleted_policy_is_undone_and_reported(
    kube: Kube, audit: AuditLog, mount_tmpfs: Any, start_agent: Any, processes: Any
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    kube.create_object(POLICIES, policy(point, token))
    pid = spawn(processes, token)
    start = audit.mark()
    running = start_agent()
    wait_until(
        lambda: size_of(point) == 16 * MiB and adj(pid) == 600, message="applied", timeout=TIMEOUT
    )
    writes = record_writes(running)
    # The agent's policy watch is open: the deletion reaches it as a watch event, not by
    # the relist minutes later.
    audit.wait_for_watch(POLICIES, user=AGENT_USER, since=start, timeout=TIMEOUT)

    kube.delete_object(POLICIES, "agent-test")
    wait_until(
        lambda: size_of(point) == 64 * MiB and adj(pid) == 0, message="restored", timeout=TIMEOUT
    )
    wait_until(
        lambda: any(tmpfs == ["Restored"] for tmpfs, _, _ in writes),
        message="reported",
        timeout=TIMEOUT,
    )
    # Written (not skipped, not refused by the API's schema), with the process restored.
    assert [(r, written) for t, r, written in writes if t == ["Restored"]] == [(["Restored"], True)]


def test_a_relabelled_node_is_undone(
    kube: Kube, mount_tmpfs: Any, start_agent: Any, processes: Any
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    kube.create_object(POLICIES, policy(point, token))
    pid = spawn(processes, token)
    start_agent()
    wait_until(
        lambda: size_of(point) == 16 * MiB and adj(pid) == 600, message="applied", timeout=TIMEOUT
    )

    kube.patch_object(NODES, "node-a", {"metadata": {"labels": {"pool": "db"}}})
    wait_until(
        lambda: size_of(point) == 64 * MiB and adj(pid) == 0, message="restored", timeout=TIMEOUT
    )


@pytest.mark.parametrize("saved", ["kept", "corrupt"])
def test_an_outage_is_not_a_deletion(  # noqa: PLR0917 - fixtures
    saved: str,
    kube: Kube,
    audit: AuditLog,
    control_plane: Any,
    mount_tmpfs: Any,
    start_agent: Any,
    processes: Any,
    tmp_path: Path,
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    kube.create_object(POLICIES, policy(point, token))
    pid = spawn(processes, token)
    state = tmp_path / "state"
    first = start_agent(state_dir=state)
    wait_until(
        lambda: size_of(point) == 16 * MiB and adj(pid) == 600, message="applied", timeout=TIMEOUT
    )
    first.halt()

    # The policy is deleted while the agent is down, then the API goes away and the
    # agent restarts: it keeps the saved policy in force, and restores nothing on account
    # of an API it cannot reach; nor when the saved policies are unusable (set aside) and
    # none is in force.
    kube.delete_object(POLICIES, "agent-test")
    if saved == "corrupt":
        (state / "policies.yaml").write_text("spec: [unclosed\n")
    control_plane.stop_apiserver()
    try:
        second = start_agent(state_dir=state, kubeconfig=first.kubeconfig)
        loop = second.cluster_agent.agent
        wait_until(
            lambda: loop.state.resyncs >= 5, message="resyncs without the API", timeout=TIMEOUT
        )
        assert (size_of(point), adj(pid)) == (16 * MiB, 600)
    finally:
        back = audit.mark()
        cluster.restart_apiserver(control_plane, kube)

    # The API is back: its LIST has no policy, and only now the node is put back.
    wait_until(
        lambda: size_of(point) == 64 * MiB and adj(pid) == 0, message="restored", timeout=TIMEOUT
    )
    listed = audit.requests(since=back, user=AGENT_USER, resource=POLICIES, verb="list")
    assert [e.code for e in listed if e.code == 200], "restored without a LIST of the policies"
