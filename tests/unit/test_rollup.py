"""A policy's status rolled up from nodes and reports: counts, failures, conditions."""

from __future__ import annotations

from typing import Any

from nodemem.controller.rollup import ReportDigest, digest_report, rollup
from samples import report_status

T0, T1 = "2026-11-26T10:00:00Z", "2026-11-26T11:00:00Z"
GiB = 1 << 30


def policy(generation: int = 2, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "shm", "generation": generation},
        "spec": {
            "nodeSelector": {"matchLabels": {"pool": "web"}},
            "tmpfs": [{"path": "/dev/shm", "size": "1Gi"}],
            "shmem": {"unaccountedThreshold": "1Gi"},
            **spec,
        },
    }


def report(generation: int, *, state: str = "Applied", unaccounted: int = 0) -> ReportDigest:
    status = digest_report(report_status(generation, state=state, unaccounted=unaccounted))
    assert status is not None
    return status


NODES = {
    "web-1": {"pool": "web"},
    "web-2": {"pool": "web"},
    "web-3": {"pool": "web"},
    "web-4": {"pool": "web"},
    "db-1": {"pool": "db"},
}


def conditions(status: Any) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_counts_and_conditions_from_reports_in_various_states() -> None:
    reports = {
        "web-1": report(2, unaccounted=2 * GiB),  # applied, over the 1Gi threshold
        "web-2": report(2, state="Refused", unaccounted=GiB // 2),  # failed
        "web-3": report(1),  # an older generation: pending
        # web-4: no report yet: pending; db-1: not selected
        "db-1": report(2, unaccounted=5 * GiB),
    }
    status = rollup(policy(), NODES, reports, now=T0)
    assert status.observed_generation == 2
    counts = status.nodes
    assert (counts.matched, counts.applied, counts.failed, counts.pending) == (4, 1, 1, 2)
    assert [f.node for f in status.failures] == ["web-2"]
    assert "Too small a size for current use" in status.failures[0].message
    assert status.shmem.unaccounted_bytes == 2 * GiB + GiB // 2
    assert status.shmem.nodes_over_threshold == 1
    assert [w.node for w in status.shmem.worst] == ["web-1", "web-2", "web-3"]
    assert conditions(status) == {
        "Accepted": ("True", "Valid"),
        "Applied": ("False", "NodesFailed"),
        "Degraded": ("True", "NodesFailed"),
    }


def test_all_applied() -> None:
    reports = {name: report(2) for name in NODES}
    status = rollup(policy(), NODES, reports, now=T0)
    assert (status.nodes.matched, status.nodes.applied) == (4, 4)
    assert conditions(status)["Applied"] == ("True", "AllNodesApplied")
    assert conditions(status)["Degraded"] == ("False", "NoFailures")


def test_an_overridden_tmpfs_item_is_not_a_failure() -> None:
    # Another item covering the mount won it: the node enforces the policy set as meant.
    reports = {name: report(2, state="Overridden") for name in NODES}
    status = rollup(policy(), NODES, reports, now=T0)
    assert (status.nodes.applied, status.nodes.failed, status.failures) == (4, 0, [])
    assert conditions(status)["Degraded"] == ("False", "NoFailures")


def test_invalid_policy_is_not_accepted_and_names_the_field() -> None:
    broken = policy(oom=[{"name": "x", "match": {"comm": "(("}, "oomScoreAdj": 5}])
    status = rollup(broken, NODES, {}, now=T0)
    accepted = next(c for c in status.conditions if c.type == "Accepted")
    assert (accepted.status, accepted.reason) == ("False", "Invalid")
    assert accepted.message.startswith("spec.oom[0].match.comm: invalid regex")
    assert status.observed_generation == 2


def test_an_unchanged_world_gives_an_identical_status() -> None:
    reports = {"web-1": report(2)}
    first = rollup(policy(), NODES, reports, now=T0)
    again = rollup(policy(), NODES, reports, first, now=T1)
    assert again == first  # transition times kept: nothing to patch


def test_transition_time_moves_only_with_the_status() -> None:
    first = rollup(policy(), NODES, {}, now=T0)
    reports = {name: report(2) for name in NODES}
    second = rollup(policy(), NODES, reports, first, now=T1)
    times = {c.type: c.last_transition_time for c in second.conditions}
    assert times == {"Accepted": T0, "Applied": T1, "Degraded": T0}
