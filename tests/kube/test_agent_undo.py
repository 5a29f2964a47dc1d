"""Undo in the cluster agent (issue 13.2), against the API emulator on this real host:
a deleted policy and a relabelled node put the tmpfs size and the adj back; an API outage
is not a deletion (nothing is restored until the API lists the policies again, even when
the policy was deleted meanwhile and the agent restarted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import test_agent_cluster as cluster
from emulator import EmulatorThread, KubeEmulator, wait_until
from test_agent_cluster import NODES, POLICIES, MiB, adj, policy, size_of, spawn, token_

from nodemem.api.status import NodeMemoryReportStatus

start_agent = cluster.start_agent  # the fixture, shared

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
    kube: KubeEmulator, mount_tmpfs: Any, start_agent: Any, processes: Any
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    kube.create_object(NODES, {"metadata": {"name": "node-a", "labels": {"pool": "web"}}})
    kube.create_object(POLICIES, policy(point, token))
    pid = spawn(processes, token)
    running = start_agent()
    wait_until(lambda: size_of(point) == 16 * MiB and adj(pid) == 600, message="applied")
    writes = record_writes(running)
    # kopf's watch must be open: a policy deleted before its first listing is never told
    # to the agent (the LIST at start saw it; kopf's listing just lacks it).
    kube.wait_for_watches(POLICIES)

    kube.delete_object(POLICIES, "agent-test")
    wait_until(lambda: size_of(point) == 64 * MiB and adj(pid) == 0, message="restored")
    wait_until(lambda: any(tmpfs == ["Restored"] for tmpfs, _, _ in writes), message="reported")
    # Written (not skipped, not refused by the API's schema), with the process restored.
    assert [(r, written) for t, r, written in writes if t == ["Restored"]] == [(["Restored"], True)]


def test_a_relabelled_node_is_undone(
    kube: KubeEmulator, mount_tmpfs: Any, start_agent: Any, processes: Any
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    kube.create_object(NODES, {"metadata": {"name": "node-a", "labels": {"pool": "web"}}})
    kube.create_object(POLICIES, policy(point, token))
    pid = spawn(processes, token)
    start_agent()
    wait_until(lambda: size_of(point) == 16 * MiB and adj(pid) == 600, message="applied")

    kube.patch_object(NODES, "node-a", {"metadata": {"labels": {"pool": "db"}}})
    wait_until(lambda: size_of(point) == 64 * MiB and adj(pid) == 0, message="restored")


@pytest.mark.parametrize("saved", ["kept", "corrupt"])
def test_an_outage_is_not_a_deletion(  # noqa: PLR0917 - fixtures
    saved: str,
    kube: KubeEmulator,
    kube_server: EmulatorThread,
    mount_tmpfs: Any,
    start_agent: Any,
    processes: Any,
    tmp_path: Path,
) -> None:
    point = mount_tmpfs(options="size=64m")
    token = token_()
    kube.create_object(NODES, {"metadata": {"name": "node-a", "labels": {"pool": "web"}}})
    kube.create_object(POLICIES, policy(point, token))
    pid = spawn(processes, token)
    state = tmp_path / "state"
    first = start_agent(state_dir=state)
    wait_until(lambda: size_of(point) == 16 * MiB and adj(pid) == 600, message="applied")
    first.halt()

    # The API goes away, the policy is deleted meanwhile, the agent restarts: it keeps
    # the saved policy in force, and restores nothing on account of an API it cannot reach;
    # nor when the saved policies are unusable (set aside) and none is in force.
    port = int(kube_server.url.rsplit(":", 1)[1])
    kube_server.stop()
    kube.delete_object(POLICIES, "agent-test")
    if saved == "corrupt":
        (state / "policies.yaml").write_text("spec: [unclosed\n")
    second = start_agent(state_dir=state)
    loop = second.cluster_agent.agent
    wait_until(lambda: loop.state.resyncs >= 5, message="resyncs without the API")
    assert (size_of(point), adj(pid)) == (16 * MiB, 600)

    # The API is back: its LIST has no policy, and only now the node is put back.
    restarted = EmulatorThread(kube, port=port).start()
    try:
        wait_until(
            lambda: size_of(point) == 64 * MiB and adj(pid) == 0, message="restored", timeout=30
        )
    finally:
        restarted.stop()
