"""Turning a host scan into the report document."""

from __future__ import annotations

from nodemem.api.report import (
    ApplyReport,
    CleanupStatus,
    DeletedOpenFile,
    HeldOpenFile,
    HostReport,
    MemorySummary,
    PolicyRef,
    ProcessRef,
    ShmemByKind,
    ShmemItem,
    ShmemSummary,
    TmpfsStatus,
    UnreadableEntry,
)
from nodemem.host.shmem import NodeScan
from nodemem.policy.apply import ApplyResult, CleanupOutcome, TmpfsOutcome
from nodemem.policy.effective import EffectivePolicy

MAX_UNREADABLE_LISTED = 20


def host_report(scan: NodeScan, top: int = 10) -> HostReport:
    memory = scan.memory
    shmem = scan.shmem
    by_kind = shmem.by_kind()
    return HostReport(
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
        unreadable_processes=scan.unreadable_processes,
        unreadable=[
            UnreadableEntry(pid=u.pid, comm=u.comm, what=u.what, reason=u.reason)
            for u in scan.unreadable[:MAX_UNREADABLE_LISTED]
        ],
    )


MAX_FILES_LISTED = 20


def tmpfs_status(outcome: TmpfsOutcome) -> TmpfsStatus:
    result = outcome.result
    return TmpfsStatus(
        path=result.path,
        pattern=outcome.pattern,
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
        errors=result.errors,
    )


def apply_report(effective: EffectivePolicy, result: ApplyResult, *, dry_run: bool) -> ApplyReport:
    return ApplyReport(
        policies=[PolicyRef(name=p.name, generation=p.generation) for p in effective.policies],
        dry_run=dry_run,
        tmpfs=[tmpfs_status(o) for o in result.tmpfs],
        cleanup=[cleanup_status(o) for o in result.cleanup],
    )
