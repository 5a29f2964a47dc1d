"""Turning a host scan into the report document."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nodemem.api.report import (
    ApplyReport,
    CleanupPatternStatus,
    CleanupStatus,
    DeletedOpenFile,
    FutileHolder,
    FutileOom,
    HeldOpenFile,
    HostReport,
    MemoryPressure,
    MemorySummary,
    OomCounts,
    OomFailure,
    OomPreview,
    OomRuleStatus,
    OomStatus,
    PodMemoryItem,
    PolicyRef,
    PredictedVictim,
    PressureLine,
    ProcessMemoryItem,
    ProcessRef,
    ProcessSummary,
    ProcessTotals,
    ShmemByKind,
    ShmemItem,
    ShmemSummary,
    TmpfsStatus,
    UnreadableEntry,
)
from nodemem.api.status import (
    Condition,
    ConditionStatus,
    NodeMemoryReportStatus,
    now_rfc3339,
    set_condition,
)
from nodemem.host.identity import read_identity, read_pod_cgroup
from nodemem.host.memcg import LOOP_KILLS, FutileMemcg
from nodemem.host.meminfo import implausible
from nodemem.host.oom_adj import AdjState
from nodemem.host.oom_predict import OomPrediction
from nodemem.host.paths import HostPaths
from nodemem.host.podmem import PodMemory
from nodemem.host.procfs import ProcessGone, ProcessUnreadable
from nodemem.host.shmem import NodeScan
from nodemem.host.smaps import ProcessAccounting
from nodemem.host.vmstat import read_oom_kills, read_pressure_lines
from nodemem.policy.apply import ApplyResult, CleanupOutcome, TmpfsOutcome
from nodemem.policy.effective import EffectiveOomRule, EffectivePolicy
from nodemem.policy.oom import (
    LISTED_ADJ_STATES,
    PLANNED,
    RESTORE_REFUSED,
    RESTORED,
    OomResult,
)
from nodemem.policy.pods import PodDirectory
from nodemem.policy.undo import RestoreResult

MAX_UNREADABLE_LISTED = 20


def host_report(
    scan: NodeScan,
    top: int = 10,
    oom: OomPreview | None = None,
    processes: ProcessSummary | None = None,
    pods: Sequence[PodMemoryItem] = (),
    *,
    pressure: MemoryPressure | None = None,
    oom_kills: int | None = None,
) -> HostReport:
    memory = scan.memory
    shmem = scan.shmem
    by_kind = shmem.by_kind()
    return HostReport(
        warnings=implausible(memory),
        memory=MemorySummary(
            total_bytes=memory.total,
            available_bytes=memory.available,
            shmem_bytes=memory.shmem,
            slab_bytes=memory.slab,
            slab_reclaimable_bytes=memory.slab_reclaimable,
            slab_unreclaimable_bytes=memory.slab_unreclaimable,
            kernel_stack_bytes=memory.kernel_stack,
            page_tables_bytes=memory.page_tables,
            vmalloc_used_bytes=memory.vmalloc_used,
            process_rss_bytes=memory.process_rss,
            pressure=pressure,
            oom_kills=oom_kills,
        ),
        shmem=ShmemSummary(
            total_bytes=shmem.total,
            attributed_bytes=shmem.attributed,
            unaccounted_bytes=shmem.unaccounted,
            by_kind=ShmemByKind(
                tmpfs=by_kind["tmpfs"],
                sysv=by_kind["sysv"],
                memfd=by_kind["memfd"],
                shared_anon=by_kind["sharedAnon"],
                detached_tmpfs=by_kind["detachedTmpfs"],
            ),
            top=[
                ShmemItem(
                    kind=obj.kind,  # type: ignore[arg-type]  # one of host.shmem.KINDS
                    name=obj.name,
                    bytes=obj.bytes,
                    pids=[ProcessRef(pid=pid, comm=comm) for pid, comm in obj.holders.items()],
                    pod=obj.pod,
                    note=obj.note,
                )
                for obj in shmem.objects[:top]
            ],
            deleted_open_files=[
                DeletedOpenFile(path=f.path, bytes=f.bytes, pid=f.pid, comm=f.comm)
                for f in shmem.deleted_open_files[:top]
            ],
        ),
        oom=oom,
        unreadable_processes=scan.unreadable_processes,
        unreadable=[
            UnreadableEntry(pid=u.pid, comm=u.comm, what=u.what, reason=u.reason)
            for u in scan.unreadable[:MAX_UNREADABLE_LISTED]
        ],
        processes=processes,
        pods=list(pods),
    )


def node_counters(paths: HostPaths) -> tuple[MemoryPressure | None, int | None]:
    """memory.pressure and memory.oomKills of the report: PSI (None without it) and
    /proc/vmstat oom_kill."""
    lines = read_pressure_lines(paths)
    pressure = None
    if lines is not None:
        some, full = (
            PressureLine(avg10=x.avg10, avg60=x.avg60, total_microseconds=x.total_us)
            if (x := lines.get(kind))
            else None
            for kind in ("some", "full")
        )
        pressure = MemoryPressure(some=some, full=full)
    return pressure, read_oom_kills(paths)


def futile_items(futile: Sequence[FutileMemcg], directory: PodDirectory) -> list[FutileOom]:
    """oom.futile: memcgs where OOM kills free nothing, their pods named where known."""

    def pod_name(uid: str | None) -> str | None:
        pod = directory.get(uid)
        return f"{pod.namespace}/{pod.name}" if pod else uid

    return [
        FutileOom(
            cgroup=f.path,
            pod=pod_name(f.pod_uid),
            usage_bytes=f.usage,
            limit_bytes=f.limit,
            shmem_bytes=f.shmem,
            freeable_bytes=f.freeable,
            oom_kills=f.oom_kills,
            loop_kills=f.loop_kills,
            holders=[FutileHolder(kind=h.kind, name=h.name, bytes=h.bytes) for h in f.holders],
        )
        for f in futile
    ]


def _oom_loop_condition(futile: Sequence[FutileOom]) -> tuple[ConditionStatus, str, str]:
    if not futile:
        return ("False", "NoFutileMemcg", "")
    looping = [f for f in futile if f.loop_kills >= LOOP_KILLS]
    what = []
    for f in (looping or futile)[:5]:
        held = next((h.name for h in f.holders if h.kind == "file"), None)
        held = held or next((h.name for h in f.holders), None)
        what.append(
            f"{f.pod or f.cgroup}: {f.shmem_bytes} of {f.usage_bytes} bytes charged are Shmem "
            f"(limit {f.limit_bytes}, a kill frees at most {f.freeable_bytes}"
            + (f", {f.loop_kills} kills seen" if f.loop_kills else "")
            + (f", held by {held}" if held else "")
            + ")"
        )
    reason = "RepeatedOOMKills" if looping else "ShmemFillsLimit"
    return ("True", reason, "; ".join(what))


def pod_memory_items(
    memory: Sequence[PodMemory], directory: PodDirectory, limit: int
) -> list[PodMemoryItem]:
    """The `limit` pods using the most memory, named when the directory knows them."""
    items = []
    for pod in sorted(memory, key=lambda m: (-m.memory_bytes, m.uid))[:limit]:
        info = directory.get(pod.uid)
        items.append(
            PodMemoryItem(
                uid=pod.uid,
                namespace=info.namespace if info else None,
                name=info.name if info else None,
                qos_class=pod.qos_class,
                memory_bytes=pod.memory_bytes,
                limit_bytes=pod.limit_bytes,
                anon_bytes=pod.anon_bytes,
                file_bytes=pod.file_bytes,
                shmem_bytes=pod.shmem_bytes,
                oom_kills=pod.oom_kills,
                pressure_some10s=pod.pressure_some_10s,
            )
        )
    return items


def process_summary(
    paths: HostPaths, accounting: ProcessAccounting, limit: int, pods: PodDirectory
) -> ProcessSummary:
    """The `limit` processes with the largest PSS, their pods, and totals over all."""
    every = accounting.processes

    def pod_of(pid: int) -> str | None:
        try:
            uid = read_pod_cgroup(paths, pid).pod_uid
        except (ProcessGone, ProcessUnreadable):
            return None
        pod = pods.get(uid)
        return f"{pod.namespace}/{pod.name}" if pod else uid

    return ProcessSummary(
        top=[
            ProcessMemoryItem(
                pid=p.pid,
                comm=p.comm,
                rss_bytes=p.rss,
                pss_bytes=p.pss,
                uss_bytes=p.uss,
                pss_shmem_bytes=p.pss_shmem,
                rss_shmem_bytes=p.rss_shmem,
                pod=pod_of(p.pid),
            )
            for p in every[:limit]
        ],
        total=ProcessTotals(
            processes=len(every),
            rss_bytes=sum(p.rss for p in every),
            pss_bytes=sum(p.pss for p in every),
            uss_bytes=sum(p.uss for p in every),
            pss_shmem_bytes=sum(p.pss_shmem or 0 for p in every),
            rss_shmem_bytes=sum(p.rss_shmem for p in every),
        ),
        unreadable_processes=len(accounting.failures),
        unreadable=[
            UnreadableEntry(pid=f.pid, comm=f.comm, what="smaps_rollup", reason=f.reason)
            for f in accounting.failures[:MAX_UNREADABLE_LISTED]
        ],
    )


MAX_FILES_LISTED = 20


def tmpfs_status(outcome: TmpfsOutcome) -> TmpfsStatus:
    result = outcome.result
    return TmpfsStatus(
        path=result.path,
        pattern=outcome.pattern,
        pod=outcome.pod,
        policy=outcome.policy,
        state=result.state.value,
        message=result.message,
        size_bytes=result.size_after if result.size_after is not None else result.size_before,
        used_bytes=result.used_bytes,
        desired_bytes=result.desired_bytes,
    )


def cleanup_status(outcome: CleanupOutcome) -> CleanupStatus:
    result = outcome.result
    return CleanupStatus(
        name=result.name,
        policy=outcome.policy,
        state=result.state.value,
        message=result.failure,
        dry_run=result.dry_run,
        files_removed=result.files_removed,
        bytes_removed=result.bytes_removed,
        dirs_removed=result.dirs_removed,
        held_open_files=len(result.held_open),
        held_open_bytes=sum(f.bytes for f in result.held_open),
        held_open=[
            HeldOpenFile(
                path=f.path,
                bytes=f.bytes,
                pids=[ProcessRef(pid=h.pid, comm=h.comm) for h in f.holders],
            )
            for f in result.held_open[:MAX_FILES_LISTED]
        ],
        would_remove=[f.path for f in result.would_remove[:MAX_FILES_LISTED]],
        locked=result.locked[:MAX_FILES_LISTED],
        errors=result.errors,
        patterns=[
            CleanupPatternStatus(pattern=p.pattern, state=p.state.value, message=p.message)
            for p in result.patterns
        ],
    )


def _cleanup_problem(status: CleanupStatus) -> str:
    if status.message:
        return f"{status.state}: {status.message}"
    patterns = [p for p in status.patterns if p.state != "Walked"]
    what = [f"{p.pattern} {p.state}" for p in patterns]
    if status.errors:
        what.append(f"{len(status.errors)} errors")
    return ", ".join(what) or status.state


def oom_status(rules: Sequence[EffectiveOomRule], result: OomResult) -> OomStatus:
    def counts(states: Mapping[str, int]) -> dict[str, Any]:
        return OomCounts(
            matched=sum(states.values()),
            adjusted=states.get(AdjState.ADJUSTED.value, 0),
            unchanged=states.get(AdjState.UNCHANGED.value, 0),
            forbidden=states.get(AdjState.FORBIDDEN.value, 0),
            failed=states.get(AdjState.FAILED.value, 0) + states.get(AdjState.REFUSED.value, 0),
            planned=states.get(PLANNED, 0),
            vanished=states.get(AdjState.VANISHED.value, 0),
            restored=states.get(RESTORED, 0),
            restore_refused=states.get(RESTORE_REFUSED, 0),
        ).model_dump()

    failures = [
        OomFailure(pid=o.pid, comm=o.comm, rule=o.rule, state=o.state, message=o.message)
        for o in result.outcomes
        if o.state in LISTED_ADJ_STATES
    ]
    restores = [
        OomFailure(pid=o.pid, comm=o.comm, rule=o.rule, state=o.state, message=o.message)
        for o in result.outcomes
        if o.state in (RESTORED, RESTORE_REFUSED)
    ]
    return OomStatus(
        **counts(result.states),
        restores=restores[:MAX_FILES_LISTED],
        rules=[
            OomRuleStatus(name=r.name, policy=r.policy, **counts(result.per_rule.get(r.name, {})))
            for r in rules
        ],
        failures=failures[:MAX_FILES_LISTED],
    )


def apply_report(effective: EffectivePolicy, result: ApplyResult, *, dry_run: bool) -> ApplyReport:
    return ApplyReport(
        policies=[PolicyRef(name=p.name, generation=p.generation) for p in effective.policies],
        dry_run=dry_run,
        tmpfs=[tmpfs_status(o) for o in result.tmpfs],
        cleanup=[cleanup_status(o) for o in result.cleanup],
        oom=oom_status(effective.oom, result.oom),
    )


def restore_report(result: RestoreResult, *, dry_run: bool) -> ApplyReport:
    """`nodemem restore`: the apply document, with only what was put back."""
    oom = oom_status((), result.oom)
    oom.restores = [  # a dry run's Planned too: here every outcome is a restore
        OomFailure(pid=o.pid, comm=o.comm, rule=o.rule, state=o.state, message=o.message)
        for o in result.oom.outcomes
    ][:MAX_FILES_LISTED]
    return ApplyReport(
        policies=[],
        dry_run=dry_run,
        tmpfs=[tmpfs_status(o) for o in result.tmpfs],
        cleanup=[],
        oom=oom,
    )


def oom_preview(paths: HostPaths, prediction: OomPrediction, pods: PodDirectory) -> OomPreview:
    def pod_of(pid: int) -> str | None:
        try:
            uid = read_identity(paths, pid).pod_uid
        except (ProcessGone, ProcessUnreadable):
            return None
        pod = pods.get(uid)
        return f"{pod.namespace}/{pod.name}" if pod else uid

    return OomPreview(
        scope=prediction.scope,
        total_pages=prediction.totalpages,
        predicted_victims=[
            PredictedVictim(
                pid=c.pid,
                comm=c.comm,
                oom_score_adj=c.oom_score_adj,
                score=c.score,
                rss_bytes=c.rss_bytes,
                pod=pod_of(c.pid),
                oom_group=c.group.cgroup if c.group else None,
                killed_with=list(c.group.killed_with) if c.group else [],
                group_rss_bytes=c.rss_bytes + (c.group.killed_with_rss_bytes if c.group else 0),
            )
            for c in prediction.victims
        ],
        badness_truncation_risk=prediction.badness_truncation_risk,
    )


def node_report_status(
    effective: EffectivePolicy,
    applied: ApplyResult,
    host: HostReport,
    cleanups: Sequence[CleanupStatus],
    previous: Sequence[Condition] = (),
    *,
    now: str | None = None,
) -> NodeMemoryReportStatus:
    """The NodeMemoryReport status: what is in force, each item's state, the memory.

    `cleanups` are the latest results per rule (cleanups run on their own schedule, not
    every cycle); `previous` conditions keep their transition times when unchanged.
    """
    now = now or now_rfc3339()
    oom = oom_status(effective.oom, applied.oom)
    if host.oom is not None:
        oom.predicted_victims = host.oom.predicted_victims
        oom.badness_truncation_risk = host.oom.badness_truncation_risk
        oom.futile = host.oom.futile
    tmpfs = [tmpfs_status(o) for o in applied.tmpfs]
    failures = [t for t in tmpfs if t.state in ("Refused", "Failed", "RestoreRefused")]
    failed_cleanups = [c for c in cleanups if c.errors or c.state != "Completed"]
    conditions = list(previous)
    applied_condition: tuple[ConditionStatus, str, str]
    degraded: tuple[ConditionStatus, str, str]
    leak: tuple[ConditionStatus, str, str]
    if failures or failed_cleanups or oom.forbidden or oom.failed or oom.restore_refused:
        what = [f"tmpfs {t.path} {t.state}" for t in failures]
        what += [f"cleanup {c.name}: {_cleanup_problem(c)}" for c in failed_cleanups]
        if oom.forbidden or oom.failed:
            what.append(f"oom: {oom.forbidden} forbidden, {oom.failed} failed")
        if oom.restore_refused:
            what.append(f"oom: {oom.restore_refused} originals not restored")
        message = "; ".join(what)
        applied_condition = ("False", "ItemsFailed", message)
        degraded = ("True", "ItemsFailed", message)
    else:
        applied_condition = ("True", "AllItemsApplied", "")
        degraded = ("False", "NoFailures", "")
    threshold = effective.unaccounted_shmem_threshold
    unaccounted = host.shmem.unaccounted_bytes
    if threshold is None:
        leak = ("Unknown", "NoThreshold", "no policy sets shmem.unaccountedThreshold")
    elif unaccounted > threshold.bytes:
        leak = (
            "True",
            "UnaccountedAboveThreshold",
            f"{unaccounted} bytes of Shmem are in no known object (threshold {threshold.bytes}, "
            f"policy {threshold.policy})",
        )
    else:
        leak = ("False", "BelowThreshold", "")
    for type_, (status, reason, message) in (
        ("Applied", applied_condition),
        ("Degraded", degraded),
        ("ShmemLeakSuspected", leak),
        ("OOMLoopRisk", _oom_loop_condition(oom.futile)),
    ):
        conditions = set_condition(conditions, type_, status, reason, message, now=now)
    return NodeMemoryReportStatus(
        policies=[PolicyRef(name=p.name, generation=p.generation) for p in effective.policies],
        memory=host.memory,
        shmem=host.shmem,
        unreadable_processes=host.unreadable_processes,
        pods=host.pods,
        tmpfs=tmpfs,
        cleanup=list(cleanups),
        oom=oom,
        conditions=conditions,
        last_update_time=now,
    )
