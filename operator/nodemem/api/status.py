"""Status of both kinds: the NodeMemoryReport a node's agent writes, and the
NodeMemoryPolicy status the controller rolls up from the reports.

Conditions follow the Kubernetes API conventions (metav1.Condition).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from nodemem.api.report import (
    CleanupStatus,
    MemorySummary,
    OomStatus,
    PodMemoryItem,
    PolicyRef,
    ReportModel,
    ShmemSummary,
    TmpfsStatus,
)

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ReportModel):
    type: str = Field(description="Accepted, Applied, Degraded, ShmemLeakSuspected or OOMLoopRisk.")
    status: ConditionStatus
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: str = Field(description="RFC 3339 time the status last changed.")
    observed_generation: int | None = Field(default=None, ge=0)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    *,
    observed_generation: int | None = None,
    now: str | None = None,
) -> list[Condition]:
    """The list with `type_` set; lastTransitionTime moves only when the status does."""
    previous = next((c for c in conditions if c.type == type_), None)
    changed = previous is None or previous.status != status
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=(now or now_rfc3339())
        if changed or previous is None
        else previous.last_transition_time,
        observed_generation=observed_generation,
    )
    return [c for c in conditions if c.type != type_] + [updated]


class NodeMemoryReportStatus(ReportModel):
    """Written by the node's agent only."""

    policies: list[PolicyRef] = Field(
        default_factory=list,
        description="The policies in force on the node, at the generation the agent applied.",
    )
    memory: MemorySummary | None = None
    shmem: ShmemSummary | None = None
    unreadable_processes: int = 0
    pods: list[PodMemoryItem] = Field(
        default_factory=list, description="The pods using the most memory, largest first."
    )
    tmpfs: list[TmpfsStatus] = Field(default_factory=list)
    cleanup: list[CleanupStatus] = Field(default_factory=list)
    oom: OomStatus | None = None
    conditions: list[Condition] = Field(default_factory=list)
    last_update_time: str | None = Field(
        default=None, description="When the agent last wrote this status (heartbeat)."
    )


class NodeCounts(ReportModel):
    matched: int = Field(default=0, description="Nodes the nodeSelector selects.")
    applied: int = Field(
        default=0, description="Nodes whose report lists this generation, without failures."
    )
    failed: int = Field(default=0, description="Nodes that report a refused or failed item.")
    pending: int = Field(default=0, description="Nodes not (yet) at this generation.")


class NodeFailure(ReportModel):
    node: str
    message: str


class NodeUnaccounted(ReportModel):
    node: str
    unaccounted_bytes: int


class PolicyShmemSummary(ReportModel):
    unaccounted_bytes: int = Field(default=0, description="Sum over the matched nodes.")
    nodes_over_threshold: int = 0
    worst: list[NodeUnaccounted] = Field(default_factory=list)


class NodeMemoryPolicyStatus(ReportModel):
    """Written by the controller only."""

    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    nodes: NodeCounts = Field(default_factory=NodeCounts)
    failures: list[NodeFailure] = Field(
        default_factory=list, description="The first few nodes that failed, and why."
    )
    shmem: PolicyShmemSummary = Field(default_factory=PolicyShmemSummary)
