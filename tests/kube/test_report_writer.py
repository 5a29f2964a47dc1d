"""The agent's report writer against the real server, as the node's agent.

A merge patch keeps every field it does not name: a status section that became empty
must still disappear from the stored report, not stay stale.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import kubernetes
from restclient import Kube

from conftest import REPORTS
from nodemem.agent.kubeapi import RawApi
from nodemem.agent.report_writer import ReportWriter
from nodemem.api.status import NodeMemoryReportStatus
from nodemem.kube import load_client_config
from samples import report_status


def test_a_section_that_became_empty_is_removed_from_the_stored_report(
    kube: Kube, agent_token: Callable[..., str], kubeconfig_for_token: Callable[[str], Path]
) -> None:
    kubeconfig = kubeconfig_for_token(agent_token("node-a"))
    client = kubernetes.client.ApiClient(load_client_config(str(kubeconfig)))
    try:
        writer = ReportWriter(RawApi(client), "node-a")
        full = NodeMemoryReportStatus.model_validate(report_status(1))
        assert full.shmem is not None and full.memory is not None
        assert writer.write(full)
        stored = kube.get_object(REPORTS, "node-a")["status"]
        assert "shmem" in stored and "memory" in stored

        assert writer.write(full.model_copy(update={"shmem": None}))
        stored = kube.get_object(REPORTS, "node-a")["status"]
        assert "shmem" not in stored
        assert stored["memory"]["totalBytes"] == full.memory.total_bytes
        # What is stored reads back as what was written (the server keeps no nulls).
        assert NodeMemoryReportStatus.model_validate(stored) == full.model_copy(
            update={"shmem": None}
        )
    finally:
        client.close()


def test_a_report_created_before_the_node_was_seen_is_owned_by_it_at_the_next_cycle(
    kube: Kube, agent_token: Callable[..., str], kubeconfig_for_token: Callable[[str], Path]
) -> None:
    kubeconfig = kubeconfig_for_token(agent_token("node-a"))
    node_uid = kube.get_object("v1/nodes", "node-a")["metadata"]["uid"]
    client = kubernetes.client.ApiClient(load_client_config(str(kubeconfig)))
    seen: list[str] = []  # the Node watch's answer, not there yet at the first write
    try:
        writer = ReportWriter(RawApi(client), "node-a", node_uid=lambda: seen[0] if seen else None)
        status = NodeMemoryReportStatus.model_validate(report_status(1))
        assert writer.write(status)
        assert "ownerReferences" not in kube.get_object(REPORTS, "node-a")["metadata"]

        seen.append(node_uid)
        assert not writer.write(status)  # nothing changed: no status write is due ...
        owners = kube.get_object(REPORTS, "node-a")["metadata"]["ownerReferences"]
        assert owners == [{"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": node_uid}]
        # ... and the owner, once added, is not sent again.
        version = kube.get_object(REPORTS, "node-a")["metadata"]["resourceVersion"]
        assert not writer.write(status)
        assert kube.get_object(REPORTS, "node-a")["metadata"]["resourceVersion"] == version
    finally:
        client.close()


def test_an_existing_report_without_owner_is_claimed_for_the_node(
    kube: Kube, agent_token: Callable[..., str], kubeconfig_for_token: Callable[[str], Path]
) -> None:
    # Left by an agent that never saw its Node, or made by hand: the create answers 409.
    kube.create_object(
        REPORTS,
        {
            "apiVersion": "nodemem.dev/v1alpha1",
            "kind": "NodeMemoryReport",
            "metadata": {"name": "node-a"},
        },
    )
    kubeconfig = kubeconfig_for_token(agent_token("node-a"))
    node_uid = kube.get_object("v1/nodes", "node-a")["metadata"]["uid"]
    client = kubernetes.client.ApiClient(load_client_config(str(kubeconfig)))
    try:
        writer = ReportWriter(RawApi(client), "node-a", node_uid=lambda: node_uid)
        status = NodeMemoryReportStatus.model_validate(report_status(1))
        assert writer.write(status)
        assert not writer.write(status)
        stored = kube.get_object(REPORTS, "node-a")
        assert [o["uid"] for o in stored["metadata"]["ownerReferences"]] == [node_uid]
        assert stored["status"]["memory"]["totalBytes"] == status.memory.total_bytes
    finally:
        client.close()
