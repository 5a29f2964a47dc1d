"""The agent's report writer against the real server, as the node's agent.

A merge patch keeps every field it does not name: a status section that became empty
must still disappear from the stored report, not stay stale.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import kubernetes
from realkube import Kube

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
