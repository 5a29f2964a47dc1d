"""Turning a host scan into the report document."""

from __future__ import annotations

from nodemem.api.report import (
    DeletedOpenFile,
    HostReport,
    MemorySummary,
    ProcessRef,
    ShmemByKind,
    ShmemItem,
    ShmemSummary,
    UnreadableEntry,
)
from nodemem.host.shmem import NodeScan

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
