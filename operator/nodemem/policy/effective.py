"""The effective policy of one node: every policy that selects it, merged item by item.

Cleanup and oom rules merge by name: for each name the item of the highest-priority
policy wins, ties going to the alphabetically first policy name. Items are listed in that
policy order, then by position within their policy, which keeps "first matching OOM rule
wins" meaningful across policies.

tmpfs items cannot merge by their path string: `/m/a` and `/m/*` name one mount. All of
them are kept, in the same merge order, and apply resolves each to its mounts and lets
the first item covering a mount win it (`tmpfs_winners`); the others are Overridden there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from nodemem.api.policy import CleanupRule, NodeMemoryPolicy, OomRule, TmpfsLimit

__all__ = [
    "EffectiveCleanup",
    "EffectiveOomRule",
    "EffectivePolicy",
    "EffectiveShmemThreshold",
    "EffectiveTmpfs",
    "PolicyRef",
    "effective_policy",
    "tmpfs_winners",
]


class PolicyRef(NamedTuple):
    """A policy as the node report names it."""

    name: str
    generation: int


@dataclass(frozen=True)
class EffectiveTmpfs:
    """A tmpfs limit in force, with sizes resolved to bytes for this node."""

    item: TmpfsLimit
    size_bytes: int
    headroom_bytes: int | None
    dry_run: bool
    policy: str
    generation: int
    priority: int = 0  # the policy's, named when this item overrides another

    @property
    def path(self) -> str:
        """The item's path, or `podShm` (api.policy.POD_SHM) for a pod /dev/shm item."""
        return self.item.name


@dataclass(frozen=True)
class EffectiveCleanup:
    """A cleanup rule in force, and the policy that supplied it."""

    item: CleanupRule
    dry_run: bool
    policy: str
    generation: int

    @property
    def name(self) -> str:
        return self.item.name


@dataclass(frozen=True)
class EffectiveOomRule:
    """An OOM rule in force, and the policy that supplied it."""

    item: OomRule
    dry_run: bool
    policy: str
    generation: int

    @property
    def name(self) -> str:
        return self.item.name


@dataclass(frozen=True)
class EffectiveShmemThreshold:
    """The unaccounted-Shmem threshold in force, in bytes."""

    bytes: int
    policy: str
    generation: int


@dataclass(frozen=True)
class EffectivePolicy:
    """What one node enforces; empty when no policy selects it."""

    policies: tuple[PolicyRef, ...]  # those selecting the node, in merge order
    tmpfs: tuple[EffectiveTmpfs, ...]
    cleanup: tuple[EffectiveCleanup, ...]
    oom: tuple[EffectiveOomRule, ...]
    unaccounted_shmem_threshold: EffectiveShmemThreshold | None


def effective_policy(
    policies: Sequence[NodeMemoryPolicy],
    node_labels: Mapping[str, str],
    node_memory_bytes: int,
) -> EffectivePolicy:
    """Merge the policies that select a node with `node_labels`.

    Percents of node memory are resolved against `node_memory_bytes` (MemTotal).
    """
    if node_memory_bytes <= 0:
        raise ValueError(f"node memory must be positive, got {node_memory_bytes} bytes")
    selected = sorted(
        (policy for policy in policies if policy.spec.node_selector.matches(node_labels)),
        key=lambda policy: (-policy.spec.priority, policy.name),
    )

    def tmpfs_of(policy: NodeMemoryPolicy, item: TmpfsLimit) -> EffectiveTmpfs:
        return EffectiveTmpfs(
            item=item,
            size_bytes=item.size.resolve(node_memory_bytes),
            headroom_bytes=None if item.headroom is None else item.headroom.bytes,
            dry_run=policy.spec.dry_run,
            policy=policy.name,
            generation=policy.generation,
            priority=policy.spec.priority,
        )

    def cleanup_of(policy: NodeMemoryPolicy, item: CleanupRule) -> EffectiveCleanup:
        return EffectiveCleanup(item, policy.spec.dry_run, policy.name, policy.generation)

    def oom_of(policy: NodeMemoryPolicy, item: OomRule) -> EffectiveOomRule:
        return EffectiveOomRule(item, policy.spec.dry_run, policy.name, policy.generation)

    threshold = next(
        (
            EffectiveShmemThreshold(
                bytes=policy.spec.shmem.unaccounted_threshold.resolve(node_memory_bytes),
                policy=policy.name,
                generation=policy.generation,
            )
            for policy in selected
            if policy.spec.shmem.unaccounted_threshold is not None
        ),
        None,
    )
    return EffectivePolicy(
        policies=tuple(PolicyRef(policy.name, policy.generation) for policy in selected),
        tmpfs=tuple(tmpfs_of(policy, item) for policy in selected for item in policy.spec.tmpfs),
        cleanup=_first_by_key(selected, lambda p: p.spec.cleanup, lambda i: i.name, cleanup_of),
        oom=_first_by_key(selected, lambda p: p.spec.oom, lambda i: i.name, oom_of),
        unaccounted_shmem_threshold=threshold,
    )


_Item = TypeVar("_Item")
_Effective = TypeVar("_Effective")


def _first_by_key(
    ordered: Iterable[NodeMemoryPolicy],
    items_of: Callable[[NodeMemoryPolicy], Sequence[_Item]],
    key_of: Callable[[_Item], str],
    effective_of: Callable[[NodeMemoryPolicy, _Item], _Effective],
) -> tuple[_Effective, ...]:
    """For each key, the item of the first policy (in merge order) that has it."""
    seen: set[str] = set()
    merged: list[_Effective] = []
    for policy in ordered:
        for item in items_of(policy):
            key = key_of(item)
            if key not in seen:
                seen.add(key)
                merged.append(effective_of(policy, item))
    return tuple(merged)


_Mount = TypeVar("_Mount")


def tmpfs_winners(
    resolved: Iterable[tuple[EffectiveTmpfs, Iterable[_Mount]]],
) -> dict[_Mount, EffectiveTmpfs]:
    """For each mount, the item in force there, given each item with the mounts it covers.

    `resolved` must be in merge order (as `EffectivePolicy.tmpfs` is): the first item that
    covers a mount wins it, so the higher priority wins, then the alphabetically first
    policy name, then, within one policy, the earlier item.
    """
    winners: dict[_Mount, EffectiveTmpfs] = {}
    for item, mounts in resolved:
        for mount in mounts:
            winners.setdefault(mount, item)
    return winners
