"""Merging the policies that select a node into its effective policy."""

from __future__ import annotations

from typing import Any

import pytest

from nodemem.api.manifest import validate_policy
from nodemem.api.policy import NodeMemoryPolicy
from nodemem.policy.effective import (
    EffectivePolicy,
    EffectiveTmpfs,
    PolicyRef,
    effective_policy,
    tmpfs_winners,
)

GI = 2**30
NODE_MEMORY = 16 * GI
WORKER = {"kubernetes.io/hostname": "w1", "role": "worker"}


def policy(name: str, generation: int = 1, **spec: Any) -> NodeMemoryPolicy:
    return validate_policy(
        {
            "apiVersion": "nodemem.dev/v1alpha1",
            "kind": "NodeMemoryPolicy",
            "metadata": {"name": name, "generation": generation},
            "spec": spec,
        }
    )


def tmpfs(path: str, size: str | int) -> dict[str, Any]:
    return {"path": path, "size": size}


def cleanup(name: str, older_than: str = "1h") -> dict[str, Any]:
    return {"name": name, "paths": ["/dev/shm/*"], "schedule": "0 * * * *", "olderThan": older_than}


def oom(name: str, adj: int) -> dict[str, Any]:
    return {"name": name, "match": {"comm": name}, "oomScoreAdj": adj}


def test_no_policy_gives_an_empty_effective_policy() -> None:
    effective = effective_policy([], WORKER, NODE_MEMORY)
    assert effective.policies == ()
    assert (effective.tmpfs, effective.cleanup, effective.oom) == ((), (), ())
    assert effective.unaccounted_shmem_threshold is None


def test_non_matching_selector_is_excluded() -> None:
    policies = [
        policy("masters", nodeSelector={"matchLabels": {"role": "master"}}, tmpfs=[tmpfs("/a", 1)]),
        policy("workers", nodeSelector={"matchLabels": {"role": "worker"}}, tmpfs=[tmpfs("/b", 1)]),
        policy("everyone", tmpfs=[tmpfs("/c", 1)]),
    ]
    effective = effective_policy(policies, WORKER, NODE_MEMORY)
    assert effective.policies == (PolicyRef("everyone", 1), PolicyRef("workers", 1))
    assert [item.path for item in effective.tmpfs] == ["/c", "/b"]


def test_tmpfs_items_are_all_kept_in_merge_order() -> None:
    # Merged per mount at apply time (tmpfs_winners): a path string says nothing of
    # which mount it shares with a glob, so no item is dropped here.
    low = policy("aaa-low", priority=1, tmpfs=[tmpfs("/dev/shm", "1Gi"), tmpfs("/run", "64Mi")])
    high = policy("zzz-high", generation=7, priority=5, tmpfs=[tmpfs("/dev/shm", "2Gi")])
    effective = effective_policy([low, high], WORKER, NODE_MEMORY)
    assert effective.policies == (PolicyRef("zzz-high", 7), PolicyRef("aaa-low", 1))
    shm_high, shm_low, run = effective.tmpfs
    assert (shm_high.path, shm_high.size_bytes, shm_high.policy, shm_high.generation) == (
        "/dev/shm",
        2 * GI,
        "zzz-high",
        7,
    )
    assert (shm_high.priority, shm_low.priority) == (5, 1)
    assert (shm_low.path, shm_low.size_bytes, shm_low.policy) == ("/dev/shm", GI, "aaa-low")
    assert (run.path, run.size_bytes, run.policy) == ("/run", 64 * 2**20, "aaa-low")
    assert tmpfs_winners((item, [item.path]) for item in effective.tmpfs) == {
        "/dev/shm": shm_high,
        "/run": run,
    }


def covering(
    effective: EffectivePolicy, mounts: dict[str, list[str]]
) -> list[tuple[EffectiveTmpfs, list[str]]]:
    """Each item with the mounts its path resolves to (as apply's find_targets would)."""
    return [(item, mounts[item.path]) for item in effective.tmpfs]


def test_tmpfs_merge_per_mount_higher_priority_wins_over_a_glob() -> None:
    a = policy("a", priority=100, tmpfs=[tmpfs("/m/a", "16Mi")])
    b = policy("b", priority=0, tmpfs=[tmpfs("/m/*", "4Mi")])
    effective = effective_policy([b, a], WORKER, NODE_MEMORY)
    exact, glob = effective.tmpfs
    winners = tmpfs_winners(covering(effective, {"/m/a": ["/m/a"], "/m/*": ["/m/a", "/m/b"]}))
    assert winners == {"/m/a": exact, "/m/b": glob}
    assert (exact.policy, exact.size_bytes) == ("a", 16 * 2**20)


def test_tmpfs_merge_per_mount_priority_beats_specificity() -> None:
    # The documented rule is priority, not the more specific path.
    a = policy("a", priority=0, tmpfs=[tmpfs("/m/a", "16Mi")])
    b = policy("b", priority=1, tmpfs=[tmpfs("/m/*", "4Mi")])
    effective = effective_policy([a, b], WORKER, NODE_MEMORY)
    glob, exact = effective.tmpfs
    winners = tmpfs_winners(covering(effective, {"/m/a": ["/m/a"], "/m/*": ["/m/a", "/m/b"]}))
    assert winners == {"/m/a": glob, "/m/b": glob}
    assert exact.policy == "a"


def test_tmpfs_merge_per_mount_ties_go_to_the_first_name_then_the_earlier_item() -> None:
    zeta = policy("zeta", tmpfs=[tmpfs("/m/a", "1Mi")])
    alpha = policy("alpha", tmpfs=[tmpfs("/m/*", "2Mi"), tmpfs("/m/a", "3Mi")])
    effective = effective_policy([zeta, alpha], WORKER, NODE_MEMORY)
    assert [(i.policy, i.path) for i in effective.tmpfs] == [
        ("alpha", "/m/*"),
        ("alpha", "/m/a"),
        ("zeta", "/m/a"),
    ]
    glob = effective.tmpfs[0]
    winners = tmpfs_winners(covering(effective, {"/m/a": ["/m/a"], "/m/*": ["/m/a", "/m/b"]}))
    assert winners == {"/m/a": glob, "/m/b": glob}


def test_tmpfs_merge_within_one_policy_the_earlier_item_wins() -> None:
    only = policy("p", tmpfs=[tmpfs("/m/a", "8Mi"), tmpfs("/m/*", "4Mi")])
    exact, glob = effective_policy([only], WORKER, NODE_MEMORY).tmpfs
    assert tmpfs_winners([(exact, ["/m/a"]), (glob, ["/m/a", "/m/b"])]) == {
        "/m/a": exact,
        "/m/b": glob,
    }


def test_tmpfs_merge_an_item_covering_nothing_wins_nothing() -> None:
    only = policy("p", tmpfs=[tmpfs("/m/*", "8Mi"), tmpfs("/n/*", "4Mi")])
    first, second = effective_policy([only], WORKER, NODE_MEMORY).tmpfs
    assert tmpfs_winners([(first, []), (second, ["/n/x"])]) == {"/n/x": second}


def test_priority_ties_go_to_the_alphabetically_first_name() -> None:
    policies = [
        policy("beta", cleanup=[cleanup("logs", "2h")]),
        policy("alpha", cleanup=[cleanup("logs", "1h")]),
    ]
    [rule] = effective_policy(policies, WORKER, NODE_MEMORY).cleanup
    assert (rule.name, rule.policy) == ("logs", "alpha")
    assert rule.item.older_than is not None and rule.item.older_than.text == "1h"


def test_negative_priority_loses_to_the_default() -> None:
    policies = [policy("a", priority=-1, oom=[oom("x", 1)]), policy("b", oom=[oom("x", 2)])]
    [rule] = effective_policy(policies, WORKER, NODE_MEMORY).oom
    assert (rule.policy, rule.item.oom_score_adj) == ("b", 2)


def test_oom_rules_keep_policy_order_then_position() -> None:
    policies = [
        policy("low", priority=0, oom=[oom("c", 3), oom("shared", 100), oom("d", 4)]),
        policy("high", priority=9, oom=[oom("b", 2), oom("shared", -100), oom("a", 1)]),
    ]
    effective = effective_policy(policies, WORKER, NODE_MEMORY)
    assert [(rule.name, rule.policy) for rule in effective.oom] == [
        ("b", "high"),
        ("shared", "high"),
        ("a", "high"),
        ("c", "low"),
        ("d", "low"),
    ]
    assert effective.oom[1].item.oom_score_adj == -100


def test_dry_run_is_per_item() -> None:
    policies = [
        policy("careful", priority=1, dryRun=True, tmpfs=[tmpfs("/a", 1)], oom=[oom("x", 1)]),
        policy("bold", tmpfs=[tmpfs("/b", 1)], cleanup=[cleanup("c")]),
    ]
    effective = effective_policy(policies, WORKER, NODE_MEMORY)
    assert [(item.path, item.dry_run) for item in effective.tmpfs] == [("/a", True), ("/b", False)]
    assert effective.oom[0].dry_run is True
    assert effective.cleanup[0].dry_run is False


def test_percent_sizes_resolve_against_node_memory() -> None:
    items = [
        {"path": "/dev/shm", "size": "10%", "headroom": "64Mi"},
        {"path": "/run/user/*", "size": "0.001%", "nrInodes": 1000},
    ]
    shm, user = effective_policy([policy("p", tmpfs=items)], WORKER, NODE_MEMORY).tmpfs
    assert shm.size_bytes == -(-NODE_MEMORY // 10)
    assert shm.headroom_bytes == 64 * 2**20
    assert user.size_bytes == -(-NODE_MEMORY * 1 // 100_000)
    assert user.item.nr_inodes == 1000
    assert user.headroom_bytes is None


def test_shmem_threshold_from_the_highest_priority_policy_that_sets_it() -> None:
    policies = [
        policy("silent", priority=9),
        policy("b-percent", priority=1, shmem={"unaccountedThreshold": "25%"}),
        policy("a-bytes", priority=0, shmem={"unaccountedThreshold": "1Gi"}),
    ]
    threshold = effective_policy(policies, WORKER, NODE_MEMORY).unaccounted_shmem_threshold
    assert threshold is not None
    assert (threshold.bytes, threshold.policy) == (NODE_MEMORY // 4, "b-percent")


def test_input_order_does_not_matter() -> None:
    policies = [
        policy("a", priority=1, tmpfs=[tmpfs("/x", 1)], oom=[oom("o", 1)]),
        policy("b", priority=1, tmpfs=[tmpfs("/x", 2)], oom=[oom("o", 2)]),
        policy("c", priority=2, tmpfs=[tmpfs("/y", 3)], oom=[oom("p", 3)]),
    ]
    forward = effective_policy(policies, WORKER, NODE_MEMORY)
    assert forward == effective_policy(policies[::-1], WORKER, NODE_MEMORY)
    assert [item.policy for item in forward.tmpfs] == ["c", "a", "b"]


def test_node_memory_must_be_positive() -> None:
    with pytest.raises(ValueError, match="node memory must be positive"):
        effective_policy([policy("p")], WORKER, 0)
