"""One policy's status, computed from the Nodes and the NodeMemoryReports. No I/O.

A node is *matched* when the policy's nodeSelector selects its labels; *applied* when
its report lists this policy at the policy's current generation and no item of the
policy failed there; *failed* when the report lists the current generation and an
item of the policy was refused or failed; *pending* otherwise (no report yet, or a
report of an older generation).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from nodemem.api.manifest import PolicyError, validate_policy
from nodemem.api.policy import NodeMemoryPolicy
from nodemem.api.status import (
    Condition,
    ConditionStatus,
    NodeCounts,
    NodeFailure,
    NodeMemoryPolicyStatus,
    NodeMemoryReportStatus,
    NodeUnaccounted,
    PolicyShmemSummary,
    set_condition,
)

MAX_FAILURES = 5
MAX_WORST = 5
FAILED_TMPFS_STATES = ("Refused", "Failed")


@dataclass(frozen=True, slots=True)
class ReportDigest:
    """What the roll-up reads of one node's report; kept per node instead of the whole
    report: parsed reports were most of the controller's memory at 5,000 nodes
    (bench/controller_scale.py)."""

    policies: Mapping[str, int]  # policy name -> generation applied
    failures: Mapping[str, tuple[str, ...]]  # policy name -> what failed, in words
    unaccounted_bytes: int | None
    total_bytes: int | None


def digest_report(status: Mapping[str, Any] | None) -> ReportDigest | None:
    """A report's digest, or None when it has no status (yet) or it does not parse."""
    if not status:
        return None
    try:
        report = NodeMemoryReportStatus.model_validate(status)
    except ValidationError:
        return None
    names = {p.name for p in report.policies}
    failures = {name: tuple(f) for name in names if (f := failures_of(name, report))}
    return ReportDigest(
        policies={p.name: p.generation for p in report.policies},
        failures=failures,
        unaccounted_bytes=report.shmem.unaccounted_bytes if report.shmem else None,
        total_bytes=report.memory.total_bytes if report.memory else None,
    )


def failures_of(policy: str, report: NodeMemoryReportStatus) -> list[str]:
    """What of `policy` failed on the node, in words."""
    failures = [
        f"tmpfs {t.path}: {t.state}: {t.message}"
        for t in report.tmpfs
        if t.policy == policy and t.state in FAILED_TMPFS_STATES
    ]
    cleanups = [c for c in report.cleanup if c.policy == policy]
    failures += [f"cleanup {c.name}: {c.state}: {c.message}" for c in cleanups if c.message]
    failures += [  # a path that could do nothing: the rule is not in force there
        f"cleanup {c.name}: {p.pattern}: {p.state}: {p.message}"
        for c in cleanups
        for p in c.patterns
        if p.state != "Walked"
    ]
    failures += [f"cleanup {c.name}: {error}" for c in cleanups for error in c.errors]
    if report.oom is not None:
        failing_rules = {
            r.name for r in report.oom.rules if r.policy == policy and (r.forbidden or r.failed)
        }
        failures += [
            f"oom rule {f.rule}: pid {f.pid} ({f.comm}): {f.state}: {f.message}"
            for f in report.oom.failures
            if f.rule in failing_rules
        ]
    return failures


def rollup(
    policy_object: Mapping[str, Any],
    nodes: Mapping[str, Mapping[str, str]],
    reports: Mapping[str, ReportDigest | None],
    previous: NodeMemoryPolicyStatus | None = None,
    *,
    now: str | None = None,
) -> NodeMemoryPolicyStatus:
    """The status the policy should have. `nodes` maps node name -> labels; `reports`
    maps node name -> parsed report status. `previous` keeps transition times stable."""
    metadata = policy_object.get("metadata") or {}
    generation = int(metadata.get("generation") or 1)
    conditions: list[Condition] = list(previous.conditions) if previous else []
    try:
        policy = validate_policy(policy_object)
    except PolicyError as error:
        conditions = set_condition(
            conditions,
            "Accepted",
            "False",
            "Invalid",
            "; ".join(error.messages),
            observed_generation=generation,
            now=now,
        )
        for type_ in ("Applied", "Degraded"):
            conditions = set_condition(
                conditions,
                type_,
                "Unknown",
                "Invalid",
                "the policy is invalid",
                observed_generation=generation,
                now=now,
            )
        return NodeMemoryPolicyStatus(observed_generation=generation, conditions=conditions)
    conditions = set_condition(
        conditions, "Accepted", "True", "Valid", observed_generation=generation, now=now
    )
    return _rolled_up(policy, nodes, reports, conditions, now)


def _rolled_up(
    policy: NodeMemoryPolicy,
    nodes: Mapping[str, Mapping[str, str]],
    reports: Mapping[str, ReportDigest | None],
    conditions: list[Condition],
    now: str | None,
) -> NodeMemoryPolicyStatus:
    name, generation = policy.name, policy.generation
    counts = NodeCounts()
    failures: list[NodeFailure] = []
    unaccounted: list[tuple[int, str]] = []
    over_threshold = 0
    threshold = policy.spec.shmem.unaccounted_threshold if policy.spec.shmem else None
    for node in sorted(nodes):
        if not policy.spec.node_selector.matches(nodes[node]):
            continue
        counts.matched += 1
        report = reports.get(node)
        if report is None or report.policies.get(name) != generation:
            counts.pending += 1
        elif problems := report.failures.get(name):
            counts.failed += 1
            if len(failures) < MAX_FAILURES:
                failures.append(NodeFailure(node=node, message="; ".join(problems)))
        else:
            counts.applied += 1
        if report is not None and report.unaccounted_bytes is not None:
            unaccounted.append((report.unaccounted_bytes, node))
            if threshold is not None and report.total_bytes is not None:
                over_threshold += report.unaccounted_bytes > threshold.resolve(report.total_bytes)
    # Largest first, ties by name; models only for the few that are shown.
    worst = heapq.nsmallest(MAX_WORST, unaccounted, key=lambda item: (-item[0], item[1]))
    conditions = _applied_and_degraded(conditions, counts, generation, now)
    return NodeMemoryPolicyStatus(
        observed_generation=generation,
        conditions=conditions,
        nodes=counts,
        failures=failures,
        shmem=PolicyShmemSummary(
            unaccounted_bytes=sum(bytes_ for bytes_, _node in unaccounted),
            nodes_over_threshold=over_threshold,
            worst=[NodeUnaccounted(node=node, unaccounted_bytes=b) for b, node in worst],
        ),
    )


def _applied_and_degraded(
    conditions: list[Condition], counts: NodeCounts, generation: int, now: str | None
) -> list[Condition]:
    applied: tuple[ConditionStatus, str, str]
    if counts.matched == 0:
        applied = ("False", "NoNodes", "the nodeSelector selects no node")
    elif counts.applied == counts.matched:
        applied = ("True", "AllNodesApplied", f"{counts.applied} of {counts.matched} nodes")
    else:
        applied = (
            "False",
            "NodesFailed" if counts.failed else "NodesPending",
            f"{counts.applied} of {counts.matched} nodes applied, {counts.failed} failed, "
            f"{counts.pending} pending",
        )
    degraded: tuple[ConditionStatus, str, str] = (
        ("True", "NodesFailed", f"{counts.failed} nodes report failures")
        if counts.failed
        else ("False", "NoFailures", "")
    )
    for type_, (status, reason, message) in (("Applied", applied), ("Degraded", degraded)):
        conditions = set_condition(
            conditions, type_, status, reason, message, observed_generation=generation, now=now
        )
    return conditions
