"""Undo: writing back the originals (host.originals) of targets no policy item holds.

A tmpfs is restored only if it is still the recorded one (namespace, mount point, st_dev
and birth time): one that is gone, or another mounted at the same path since, is dropped
from the record, never resized. A process is restored only if its pid still names the
recorded process (start time): one that exited needs nothing. Whatever the kernel refuses
(the original size is now below use, a lower oom_score_adj without CAP_SYS_RESOURCE) is
RestoreRefused and stays in the record, to be tried again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nodemem.api.quantity import format_bytes
from nodemem.host.mounts import MountinfoError
from nodemem.host.oom_adj import AdjState, read_oom_score_adj, set_oom_score_adj
from nodemem.host.originals import (
    AdjOriginal,
    Originals,
    TmpfsKey,
    TmpfsOriginal,
    birth_time,
    mount_namespace,
    pids_in_namespace,
)
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import ProcessGone, ProcessUnreadable, start_time
from nodemem.host.tmpfs_limits import LimitResult, LimitState, Target, apply_limit, find_targets
from nodemem.policy.apply import FAILED_TMPFS_STATES, TmpfsOutcome
from nodemem.policy.oom import PLANNED, RESTORE_REFUSED, RESTORED, OomOutcome, OomResult

log = logging.getLogger("nodemem.undo")

_RESTORED_TMPFS = frozenset({LimitState.APPLIED, LimitState.UNCHANGED})
_GONE_TMPFS = frozenset({LimitState.NOT_FOUND, LimitState.NOT_TMPFS})


@dataclass
class RestoreResult:
    tmpfs: list[TmpfsOutcome] = field(default_factory=list)
    oom: OomResult = field(default_factory=OomResult)

    @property
    def failed(self) -> bool:
        return any(o.result.state in FAILED_TMPFS_STATES for o in self.tmpfs) or self.oom.failed


def restore_tmpfs(
    paths: HostPaths,
    originals: Originals,
    *,
    keep: Callable[[TmpfsKey], bool] = lambda _: False,
    dry_run: bool = False,
) -> list[TmpfsOutcome]:
    """Restore every recorded tmpfs but those `keep` names (an item holds them)."""
    outcomes: list[TmpfsOutcome] = []
    dropped = False
    for key, original in list(originals.tmpfs.items()):
        if keep(key):
            continue
        outcome = _restore_tmpfs(paths, original, dry_run=dry_run)
        if (outcome is None or outcome.result.state is LimitState.RESTORED) and not dry_run:
            originals.drop_tmpfs(key)
            dropped = True
        if outcome is not None:
            outcomes.append(outcome)
    if dropped:
        originals.compact()
    return outcomes


def held_superblocks(targets: Iterable[Target | None]) -> set[int]:
    """The st_dev of every tmpfs the items hold, to compare with records' keys (`keep`).

    By superblock, not mount: one tmpfs bind-mounted into several namespaces (a pod's
    /dev/shm in each container) is held while any item holds one of its mounts. Live
    superblocks never share a st_dev; a record whose tmpfs is gone while its st_dev went to
    a held one stays until restoring it finds the birth time differ.
    """
    return {t.mount.dev for t in targets if t is not None and t.mount is not None}


def _restore_tmpfs(
    paths: HostPaths, original: TmpfsOriginal, *, dry_run: bool
) -> TmpfsOutcome | None:
    """The outcome; None when the recorded tmpfs is gone (nothing to restore)."""
    key = original.key
    target = _reach(paths, original)
    if target is None:
        log.info("tmpfs %s is gone or another one: not restored", key.mount_point)
        return None
    result = apply_limit(
        target,
        original.size_bytes,
        # 0 is unlimited, which a policy cannot have changed (the kernel refuses to limit
        # an unlimited tmpfs): leave it, as the kernel must never be sent 0.
        nr_inodes=original.nr_inodes or None,
        dry_run=dry_run,
    )
    if result.state in _GONE_TMPFS:
        return None
    what = f"size {format_bytes(original.size_bytes)}" + (
        f", nr_inodes {original.nr_inodes}" if original.nr_inodes else ""
    )
    changed_by = f"(changed by policy {original.policy})"
    if result.state in _RESTORED_TMPFS:
        state, message = LimitState.RESTORED, f"restored the original {what} {changed_by}"
    elif result.state is LimitState.PLANNED:
        state, message = LimitState.PLANNED, f"would restore the original {what} {changed_by}"
    else:
        state = LimitState.RESTORE_REFUSED
        message = f"restoring the original {what} failed: {result.message}; tried again"
    restored = LimitResult(
        path=result.path,
        state=state,
        message=message,
        size_before=result.size_before,
        size_after=result.size_after,
        used_bytes=result.used_bytes,
        desired_bytes=original.size_bytes,
        inodes_before=result.inodes_before,
        inodes_after=result.inodes_after,
        inodes_used=result.inodes_used,
    )
    pattern = original.pattern or key.mount_point
    return TmpfsOutcome(original.policy, pattern, restored, target, original.pod)


def _reach(paths: HostPaths, original: TmpfsOriginal) -> Target | None:
    """The recorded tmpfs, through a process of its namespace; None when it is gone."""
    key = original.key
    pid = original.namespace_pid
    if mount_namespace(paths, pid) != key.namespace:
        if pid is None:  # the host's own namespace is never another
            return None
        pid = next(pids_in_namespace(paths, key.namespace), None)
        if pid is None:
            return None
    try:
        targets = find_targets(paths, key.mount_point, pid)
    except (ProcessGone, ProcessUnreadable, OSError, MountinfoError):
        return None
    target = next((t for t in targets if t.mount_point == key.mount_point), None)
    if target is None or target.mount is None or target.mount.dev != key.dev:
        return None
    if birth_time(target.path) != key.birth:
        return None  # the freed st_dev went to a tmpfs mounted there later
    return target


def restore_adj(
    paths: HostPaths,
    originals: Originals,
    result: OomResult,
    *,
    keep: Callable[[AdjOriginal], bool] = lambda _: False,
    dry_run: bool = False,
) -> None:
    """Restore every recorded process but those `keep` names, into `result`."""
    dropped = False
    for key, original in list(originals.adj.items()):
        if keep(original):
            continue
        outcome = _restore_adj(paths, original, dry_run=dry_run)
        if (outcome is None or outcome.state == RESTORED) and not dry_run:
            originals.drop_adj(key)
            dropped = True
        if outcome is not None:
            result.record_restore(outcome)
    if dropped:
        originals.compact()


def _restore_adj(paths: HostPaths, original: AdjOriginal, *, dry_run: bool) -> OomOutcome | None:
    """The outcome; None when the process exited (or its pid names another)."""
    pid, value = original.pid, original.value

    def outcome(state: str, previous: int | None, message: str) -> OomOutcome:
        return OomOutcome(
            pid, original.comm, original.rule, original.policy, state, previous, value, message
        )

    if dry_run:
        try:
            if start_time(paths, pid) != original.start:
                return None
            current = read_oom_score_adj(paths, pid)
        except (ProcessGone, ProcessUnreadable, ValueError):
            return None
        return outcome(PLANNED, current, f"would restore {current} -> {value}")
    written = set_oom_score_adj(paths, pid, value, expected_start=original.start)
    if written.state in (AdjState.VANISHED, AdjState.GONE):
        return None
    if written.state in (AdjState.ADJUSTED, AdjState.UNCHANGED):
        return outcome(
            RESTORED,
            written.previous,
            f"restored the original {value} (was {written.previous}, set by rule "
            f"{original.rule} of policy {original.policy})",
        )
    return outcome(
        RESTORE_REFUSED,
        written.previous,
        f"restoring the original {value} failed: {written.message}; tried again",
    )


def restore_all(paths: HostPaths, originals: Originals, *, dry_run: bool) -> RestoreResult:
    """`nodemem restore`: everything recorded."""
    result = RestoreResult()
    result.tmpfs = restore_tmpfs(paths, originals, dry_run=dry_run)
    restore_adj(paths, originals, result.oom, dry_run=dry_run)
    return result
