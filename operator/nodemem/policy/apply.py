"""Applying one node's effective policy through host/: tmpfs limits, cleanups, OOM rules.

Every item gets a state; nothing one item does (or fails to do) stops the others.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nodemem.api.policy import PodVolumeSelector
from nodemem.host.cleanup import CleanupResult, CleanupSpec, run_cleanup
from nodemem.host.paths import HostPaths
from nodemem.host.pods import pod_volume_from_path
from nodemem.host.procfs import Holder
from nodemem.host.tmpfs_limits import LimitResult, LimitState, apply_limit, find_targets
from nodemem.policy.effective import EffectiveCleanup, EffectivePolicy, EffectiveTmpfs
from nodemem.policy.oom import OomResult, apply_oom_rules
from nodemem.policy.pods import PodDirectory

# States that mean "the policy could not be enforced here": exit status 1, condition Degraded.
FAILED_TMPFS_STATES = frozenset({LimitState.REFUSED, LimitState.FAILED})


@dataclass(frozen=True)
class TmpfsOutcome:
    policy: str
    pattern: str
    result: LimitResult


@dataclass(frozen=True)
class CleanupOutcome:
    policy: str
    result: CleanupResult


@dataclass
class ApplyResult:
    tmpfs: list[TmpfsOutcome] = field(default_factory=list)
    cleanup: list[CleanupOutcome] = field(default_factory=list)
    oom: OomResult = field(default_factory=OomResult)

    @property
    def failed(self) -> bool:
        return (
            any(o.result.state in FAILED_TMPFS_STATES for o in self.tmpfs)
            or any(o.result.errors for o in self.cleanup)
            or self.oom.failed
        )


def selects_pod_volume(selector: PodVolumeSelector, mount_point: str, pods: PodDirectory) -> bool:
    """Whether a mount is a volume of a pod the selector names (pods not on this node,
    or not known yet, never match)."""
    volume = pod_volume_from_path(mount_point)
    pod = pods.get(volume.pod_uid) if volume else None
    if volume is None or pod is None:
        return False
    if selector.namespace is not None and pod.namespace != selector.namespace:
        return False
    if selector.label_selector is not None and not selector.label_selector.matches(pod.labels):
        return False
    return selector.volume is None or fnmatch.fnmatchcase(volume.volume, selector.volume)


def apply_tmpfs(
    paths: HostPaths,
    item: EffectiveTmpfs,
    *,
    dry_run: bool,
    pods: PodDirectory | None = None,
) -> list[TmpfsOutcome]:
    targets = find_targets(paths, item.path)
    selector = item.item.pods
    if selector is not None:
        directory = pods or PodDirectory()
        targets = [t for t in targets if selects_pod_volume(selector, t.mount_point, directory)]
    if not targets:
        missing = LimitResult(
            path=item.path,
            state=LimitState.NOT_FOUND,
            message="no mount point matches" + (" for the selected pods" if selector else ""),
        )
        return [TmpfsOutcome(item.policy, item.path, missing)]
    return [
        TmpfsOutcome(
            item.policy,
            item.path,
            apply_limit(
                target,
                item.size_bytes,
                nr_inodes=item.item.nr_inodes,
                headroom_bytes=item.headroom_bytes,
                dry_run=dry_run or item.dry_run,
            ),
        )
        for target in targets
    ]


def cleanup_spec(item: EffectiveCleanup) -> CleanupSpec:
    rule = item.item
    return CleanupSpec(
        name=rule.name,
        paths=tuple(rule.paths),
        older_than=rule.older_than.delta if rule.older_than else None,
        age=tuple(rule.age),
        when_usage_above=float(rule.when_usage_above.value) / 100
        if rule.when_usage_above
        else None,
        target_usage=float(rule.target_usage.value) / 100 if rule.target_usage else None,
        exclude=tuple(rule.exclude),
        remove_empty_dirs=rule.remove_empty_dirs,
    )


def apply_cleanups(
    paths: HostPaths,
    items: Sequence[EffectiveCleanup],
    held_open: Mapping[tuple[int, int], Sequence[Holder]],
    *,
    dry_run: bool,
) -> list[CleanupOutcome]:
    return [
        CleanupOutcome(
            item.policy,
            run_cleanup(paths, cleanup_spec(item), held_open, dry_run=dry_run or item.dry_run),
        )
        for item in items
    ]


def apply_policy(
    paths: HostPaths,
    effective: EffectivePolicy,
    *,
    dry_run: bool,
    cleanups: Sequence[EffectiveCleanup] = (),
    held_open: Mapping[tuple[int, int], Sequence[Holder]] | None = None,
    pods: PodDirectory | None = None,
) -> ApplyResult:
    """Apply tmpfs limits, run `cleanups` (the rules that are due, or all when asked),
    then set oom_score_adj on every running process a rule matches."""
    result = ApplyResult()
    for item in effective.tmpfs:
        result.tmpfs.extend(apply_tmpfs(paths, item, dry_run=dry_run, pods=pods))
    if cleanups:
        result.cleanup = apply_cleanups(paths, cleanups, held_open or {}, dry_run=dry_run)
    result.oom = apply_oom_rules(paths, effective.oom, pods or PodDirectory(), dry_run=dry_run)
    return result
