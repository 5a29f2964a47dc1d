"""Which states in a node's report become Kubernetes Events (`agent.events` rate-limits them)."""

from __future__ import annotations

from nodemem.agent.main import Reporter
from nodemem.agent.metrics import AgentMetrics
from nodemem.api.report import CleanupStatus
from nodemem.api.status import NodeMemoryReportStatus
from nodemem.host.paths import HostPaths


class RecordingEvents:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def event(self, reason: str, message: str) -> None:
        self.events.append((reason, message))


def events_for(status: NodeMemoryReportStatus) -> list[tuple[str, str]]:
    recorder = RecordingEvents()
    reporter = Reporter(None, recorder, AgentMetrics(), HostPaths())  # type: ignore[arg-type]
    reporter._post_events(status, {})
    return recorder.events


def test_a_cleanup_that_could_not_do_its_work_is_an_event() -> None:
    status = NodeMemoryReportStatus(
        cleanup=[
            CleanupStatus(name="ok", policy="p"),
            CleanupStatus(
                name="typo", policy="p", state="Incomplete", message="/m/lgos does not exist"
            ),
            CleanupStatus(name="boom", policy="p", state="Failed", message="ValueError: x"),
        ]
    )
    assert events_for(status) == [
        ("CleanupIncomplete", "rule typo: /m/lgos does not exist"),
        ("CleanupFailed", "rule boom: ValueError: x"),
    ]
