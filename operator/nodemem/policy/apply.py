"""Applying one node's effective policy through host/: tmpfs limits, cleanups, OOM rules.

Every item gets a state; nothing one item does (or fails to do) stops the others.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nodemem.api.policy import PodVolumeSelector
from nodemem.host.cleanup import CleanupResult, CleanupSpec, CleanupState, run_cleanup
from nodemem.host.originals import Originals, TmpfsKey, TmpfsOriginal, birth_time, mount_namespace
from nodemem.host.paths import HostPaths
from nodemem.host.pods import pod_volume_from_path
from nodemem.host.procfs import Holder
from nodemem.host.tmpfs_limits import LimitResult, LimitState, Target, apply_limit, find_targets
from nodemem.policy.effective import (
    EffectiveCleanup,
    EffectivePolicy,
    EffectiveTmpfs,
    tmpfs_winners,
)
from nodemem.policy.oom import OomResult, apply_oom_rules
from nodemem.policy.pod_shm import PodShmTargets
from nodemem.policy.pods import PodDirectory

log = logging.getLogger("nodemem.apply")

# States that mean "the policy could not be enforced here": exit status 1, condition Degraded.
FAILED_TMPFS_STATES = frozenset({LimitState.REFUSED, LimitState.FAILED, LimitState.RESTORE_REFUSED})


@dataclass(frozen=True)
class TmpfsOutcome:
    policy: str
    pattern: str
    result: LimitResult
    target: Target | None = None  # the mount it is about (None: no mount matched)
    pod: str | None = None  # podShm items: namespace/name of the pod whose /dev/shm it is


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
            or any(o.result.state is not CleanupState.COMPLETED for o in self.cleanup)
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
    items: Sequence[EffectiveTmpfs],
    *,
    dry_run: bool,
    pods: PodDirectory | None = None,
    originals: Originals | None = None,
    pod_shm: PodShmTargets | None = None,
) -> list[TmpfsOutcome]:
    """Resolve every item to its mounts, then apply each mount's winning item only.

    `items` in merge order (EffectivePolicy.tmpfs). Merging by mount, not by path string,
    keeps `/m/a` and `/m/*` from remounting /m/a in turn every run; each losing item is
    reported Overridden on that mount, naming the winner. A mount's size and nr_inodes
    are put in `originals` before its first change. podShm items resolve through
    `pod_shm` (by default every pod's process is looked at, once for all items).
    """
    directory = pods or PodDirectory()
    shm = pod_shm or PodShmTargets(paths, directory)
    resolved = [(item, _targets(paths, item, directory, shm)) for item in items]
    winners = tmpfs_winners(
        (item, [(t.namespace_pid, t.mount_point) for t in targets]) for item, targets in resolved
    )
    in_force: dict[tuple[int | None, str], LimitResult] = {}
    outcomes: list[TmpfsOutcome] = []
    for item, targets in resolved:
        passed_over = shm.passed_over(item.item.pods) if item.item.pod_shm else []
        for label, result in passed_over:
            outcomes.append(TmpfsOutcome(item.policy, item.path, result, pod=label))
        if not targets and not passed_over:
            missing = LimitResult(
                path=item.path,
                state=LimitState.NOT_FOUND,
                message="no running process of a selected pod shows a /dev/shm"
                if item.item.pod_shm
                else "no mount point matches"
                + (" for the selected pods" if item.item.pods else ""),
            )
            outcomes.append(TmpfsOutcome(item.policy, item.path, missing))
        for target in targets:
            key = (target.namespace_pid, target.mount_point)
            winner = winners[key]
            pod = shm.pod_of(target) if item.item.pod_shm else None
            if winner is item:
                item_dry_run = dry_run or item.dry_run
                if originals is not None and not item_dry_run:
                    record_original(paths, target, item, originals, pod)
                result = apply_limit(
                    target,
                    item.size_bytes,
                    nr_inodes=item.item.nr_inodes,
                    headroom_bytes=item.headroom_bytes,
                    dry_run=item_dry_run,
                )
                in_force[key] = result
            else:  # the winner comes first in merge order: its result is known
                result = _overridden(target.mount_point, item, winner, in_force.get(key))
            outcomes.append(TmpfsOutcome(item.policy, item.path, result, target, pod))
    return outcomes


def tmpfs_key(paths: HostPaths, target: Target) -> TmpfsKey | None:
    """How the record of originals names the tmpfs at `target`; None when it is not a mount
    or its namespace is gone."""
    namespace = mount_namespace(paths, target.namespace_pid)
    if target.mount is None or namespace is None:
        return None
    return TmpfsKey(namespace, target.mount_point, target.mount.dev, birth_time(target.path))


def record_original(
    paths: HostPaths,
    target: Target,
    item: EffectiveTmpfs,
    originals: Originals,
    pod: str | None = None,
) -> None:
    """Before the first change to a mount: its size and nr_inodes as they are (a mount
    already recorded keeps its first original: the value now is a policy's)."""
    key = tmpfs_key(paths, target)
    if key is None or key in originals.tmpfs:
        return
    plan = apply_limit(
        target,
        item.size_bytes,
        nr_inodes=item.item.nr_inodes,
        headroom_bytes=item.headroom_bytes,
        dry_run=True,
    )
    if plan.state is LimitState.PLANNED and plan.size_before and plan.inodes_before is not None:
        originals.add_tmpfs(
            TmpfsOriginal(
                key,
                target.namespace_pid,
                plan.size_before,
                plan.inodes_before,
                item.policy,
                pattern=item.path,
                pod=pod,
            )
        )


def _targets(
    paths: HostPaths, item: EffectiveTmpfs, pods: PodDirectory, shm: PodShmTargets
) -> list[Target]:
    if item.item.pod_shm:
        return shm.targets(item.item.pods)
    targets = find_targets(paths, item.path)
    selector = item.item.pods
    if selector is not None:
        targets = [t for t in targets if selects_pod_volume(selector, t.mount_point, pods)]
    return targets


def _overridden(
    mount_point: str, loser: EffectiveTmpfs, winner: EffectiveTmpfs, won: LimitResult | None
) -> LimitResult:
    wanted = f"size {winner.item.size}"
    if winner.item.nr_inodes is not None:
        wanted += f", nrInodes {winner.item.nr_inodes}"
    item = "" if winner.path == mount_point else f", item {winner.path}"
    return LimitResult(
        path=mount_point,
        state=LimitState.OVERRIDDEN,
        message=f"overridden on {mount_point} by policy {winner.policy} "
        f"(priority {winner.priority}){item}: {wanted}",
        # What is in force there now, and what this item would have asked for.
        size_before=None if won is None else won.size_before,
        size_after=None if won is None else won.size_after,
        used_bytes=None if won is None else won.used_bytes,
        desired_bytes=loser.size_bytes,
    )


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
    """Run each rule once. A rule that raises gets state Failed with the reason; the other
    rules still run (and the agent's loop goes on)."""
    outcomes: list[CleanupOutcome] = []
    for item in items:
        item_dry_run = dry_run or item.dry_run
        try:
            result = run_cleanup(paths, cleanup_spec(item), held_open, dry_run=item_dry_run)
        except Exception as exc:
            log.error("cleanup %s failed", item.name, exc_info=True)
            result = CleanupResult.failed(
                item.name, dry_run=item_dry_run, message=f"{type(exc).__name__}: {exc}"
            )
        outcomes.append(CleanupOutcome(item.policy, result))
    return outcomes


def apply_policy(
    paths: HostPaths,
    effective: EffectivePolicy,
    *,
    dry_run: bool,
    cleanups: Sequence[EffectiveCleanup] = (),
    held_open: Mapping[tuple[int, int], Sequence[Holder]] | None = None,
    pods: PodDirectory | None = None,
    originals: Originals | None = None,
) -> ApplyResult:
    """Apply tmpfs limits, run `cleanups` (the rules that are due, or all when asked),
    then set oom_score_adj on every running process a rule matches. What is changed is
    put in `originals` first (see host.originals)."""
    result = ApplyResult()
    result.tmpfs = apply_tmpfs(
        paths, effective.tmpfs, dry_run=dry_run, pods=pods, originals=originals
    )
    if cleanups:
        result.cleanup = apply_cleanups(paths, cleanups, held_open or {}, dry_run=dry_run)
    result.oom = apply_oom_rules(
        paths, effective.oom, pods or PodDirectory(), dry_run=dry_run, originals=originals
    )
    return result
