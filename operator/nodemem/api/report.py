"""What a node reports about its memory: the `nodemem report --json` document, which is
also the memory part of the NodeMemoryReport status."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)
from pydantic.alias_generators import to_camel

ShmemKind = Literal["tmpfs", "sysv", "memfd", "sharedAnon", "detachedTmpfs"]


def printable(text: str) -> str:
    """`text` as valid UTF-8 text.

    Names come from the host as the OS gives them: a file, mount or process may be
    named with bytes that are not UTF-8, which Python keeps as surrogates (so the
    path still works in system calls). JSON, the API server and terminals need text:
    those bytes become U+FFFD, in ReportModel, the one place every report passes.
    """
    try:
        raw = text.encode(errors="surrogateescape")
    except UnicodeEncodeError:  # a surrogate no OS name makes (e.g. JSON "\ud800")
        raw = text.encode(errors="replace")
    return raw.decode(errors="replace")


class ReportModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _printable(cls, value: object) -> object:
        # str and list[str] fields; nested models make their own fields printable.
        if isinstance(value, str):
            return printable(value)
        if isinstance(value, list) and any(isinstance(item, str) for item in value):
            return [printable(item) if isinstance(item, str) else item for item in value]
        return value


class PressureLine(ReportModel):
    avg10: float = Field(description="Percent of the last 10 s tasks stalled on memory.")
    avg60: float = Field(description="Percent of the last 60 s.")
    total_microseconds: int = Field(description="Stall time since boot.")


class MemoryPressure(ReportModel):
    """/proc/pressure/memory (PSI): `some`, at least one task stalled on memory; `full`,
    all non-idle tasks at once."""

    some: PressureLine | None = None
    full: PressureLine | None = None


class MemorySummary(ReportModel):
    """Where the node's memory is, from /proc/meminfo and the process table. Bytes."""

    total_bytes: int = Field(description="MemTotal.")
    available_bytes: int = Field(description="MemAvailable (Shmem is not in it: not reclaimable).")
    shmem_bytes: int = Field(description="Shmem: tmpfs, SysV, memfd, shared anonymous memory.")
    slab_bytes: int = Field(description="Kernel slab caches (reclaimable + unreclaimable).")
    slab_reclaimable_bytes: int = Field(description="SReclaimable.")
    slab_unreclaimable_bytes: int = Field(description="SUnreclaim.")
    kernel_stack_bytes: int = Field(description="KernelStack.")
    page_tables_bytes: int = Field(description="PageTables.")
    vmalloc_used_bytes: int = Field(description="VmallocUsed.")
    process_rss_bytes: int = Field(
        description="Sum of VmRSS over all processes (shared pages counted once per process)."
    )
    pressure: MemoryPressure | None = Field(
        default=None,
        description="/proc/pressure/memory; null where the kernel has no PSI (CONFIG_PSI off, "
        "or psi=0 on its command line).",
    )
    oom_kills: int | None = Field(
        default=None,
        description="/proc/vmstat oom_kill: OOM kills since boot (null before Linux 4.13).",
    )


class ProcessRef(ReportModel):
    pid: int
    comm: str


class ShmemItem(ReportModel):
    kind: ShmemKind
    name: str = Field(description="Mount point, `shmid N`, `memfd:NAME` or `/dev/zero`.")
    bytes: int
    pids: list[ProcessRef] = Field(
        default_factory=list, description="Processes holding it (fd, mapping or attach)."
    )
    pod: str | None = Field(default=None, description="UID of the pod it belongs to, if known.")
    note: str = ""


class ShmemByKind(ReportModel):
    tmpfs: int = 0
    sysv: int = 0
    memfd: int = 0
    shared_anon: int = 0
    detached_tmpfs: int = 0


class DeletedOpenFile(ReportModel):
    path: str
    bytes: int
    pid: int
    comm: str


class ShmemSummary(ReportModel):
    total_bytes: int = Field(description="Shmem from /proc/meminfo.")
    attributed_bytes: int = Field(description="Sum of byKind: Shmem found in named objects.")
    unaccounted_bytes: int = Field(description="totalBytes - attributedBytes.")
    by_kind: ShmemByKind
    top: list[ShmemItem] = Field(description="The largest objects, by bytes descending.")
    deleted_open_files: list[DeletedOpenFile] = Field(
        default_factory=list,
        description="Unlinked tmpfs files still held open or mapped (already inside their "
        "tmpfs's bytes).",
    )


class UnreadableEntry(ReportModel):
    pid: int
    comm: str
    what: str = Field(description="What could not be read, e.g. `fd`, `maps`, `ns/ipc`.")
    reason: str


class PredictedVictim(ReportModel):
    pid: int
    comm: str
    oom_score_adj: int
    score: int = Field(description="The kernel's oom_badness in pages (may be negative).")
    rss_bytes: int
    pod: str | None = Field(default=None, description="namespace/name, or the pod UID.")
    oom_group: str | None = Field(
        default=None,
        description="cgroup v2: the cgroup (path as in /proc/PID/cgroup) whose "
        "memory.oom.group=1 makes this kill a group kill; null when only this process dies "
        "(always on v1).",
    )
    killed_with: list[int] = Field(
        default_factory=list,
        description="Pids of every other process the kernel kills with it (the group's, "
        "except oom_score_adj -1000 and init); [] when none.",
    )
    group_rss_bytes: int = Field(description="RSS of this process and killedWith together.")


class FutileHolder(ReportModel):
    kind: str = Field(
        description="A Shmem kind (tmpfs, sysv, memfd, sharedAnon, detachedTmpfs), or `file`: "
        "one of the largest files of the tmpfs listed before it."
    )
    name: str = Field(description="Mount point, file path, `shmid N`, `memfd:NAME`.")
    bytes: int


class FutileOom(ReportModel):
    """A memory cgroup near its limit whose charge is mostly Shmem: no OOM kill can free
    it (usage >= 90 % of the limit, shmem >= 50 % of usage)."""

    cgroup: str = Field(description="The memcg's path in the memory hierarchy.")
    pod: str | None = Field(default=None, description="namespace/name, or the pod UID.")
    usage_bytes: int = Field(description="memory.current (v1: memory.usage_in_bytes).")
    limit_bytes: int = Field(description="memory.max (v1: memory.limit_in_bytes).")
    shmem_bytes: int = Field(description="memory.stat shmem (v1: total_shmem).")
    freeable_bytes: int = Field(
        description="usageBytes - shmemBytes: the most that reclaim and killing every task in "
        "it can give back (tmpfs files and SysV segments outlive their tasks)."
    )
    oom_kills: int | None = Field(
        default=None, description="memory.events oom_kill (v1: oom_control, summed below)."
    )
    loop_kills: int = Field(
        default=0,
        description="OOM kills the agent saw in this memcg, across its cycles, while it stayed "
        "like this (0 in a one-shot report); 2 or more: an OOM loop.",
    )
    holders: list[FutileHolder] = Field(
        default_factory=list,
        description="Shmem objects whose pages may be charged there (the pod's, or held by a "
        "task inside), largest first, each tmpfs followed by its largest files.",
    )


class OomPreview(ReportModel):
    """Who the OOM killer would take next, computed with the kernel's own formula."""

    scope: str = Field(description="`node`, or the memory cgroup the preview is for.")
    total_pages: int = Field(description="RAM + swap, or the cgroup's limit, in pages.")
    predicted_victims: list[PredictedVictim] = Field(description="Next victim first.")
    futile: list[FutileOom] = Field(
        default_factory=list, description="Memory cgroups where OOM kills free nothing."
    )
    badness_truncation_risk: bool = Field(
        description="Kernel before 5.9 and processes with negative oom_score_adj: ties at "
        "score 1 are broken by scan order, not size, so the order is uncertain."
    )


class ProcessMemoryItem(ReportModel):
    """One process's memory, from /proc/PID/smaps_rollup. Bytes."""

    pid: int
    comm: str
    rss_bytes: int = Field(description="Rss: every page it maps, shared ones in full.")
    pss_bytes: int = Field(
        description="Pss: each page divided by the number of processes mapping it; summed "
        "over all processes every page counts once."
    )
    uss_bytes: int = Field(
        description="Private_Clean + Private_Dirty: pages only it maps, freed if it exits."
    )
    pss_shmem_bytes: int | None = Field(
        description="Pss_Shmem: its share of the Shmem it maps (null before kernel 5.7)."
    )
    rss_shmem_bytes: int = Field(description="RssShmem (status): the Shmem pages it maps, in full.")
    pod: str | None = Field(default=None, description="namespace/name, or the pod UID.")


class ProcessTotals(ReportModel):
    """Sums over every process read (not only the listed ones). Bytes."""

    processes: int = Field(description="Processes whose smaps_rollup was read.")
    rss_bytes: int
    pss_bytes: int
    uss_bytes: int
    pss_shmem_bytes: int
    rss_shmem_bytes: int


class ProcessSummary(ReportModel):
    """`nodemem report --processes`: the processes with the largest PSS."""

    top: list[ProcessMemoryItem] = Field(description="Largest PSS first.")
    total: ProcessTotals
    unreadable_processes: int = Field(
        description="Processes whose smaps_rollup was refused (another user's, without "
        "CAP_SYS_PTRACE) or could not be parsed; not in the total."
    )
    unreadable: list[UnreadableEntry] = Field(
        default_factory=list, description="The first few of them, for diagnosis."
    )


class PodMemoryItem(ReportModel):
    """One pod's memory, from its pod cgroup (the sum of its containers). Bytes."""

    uid: str
    namespace: str | None = Field(default=None, description="From --pods-file or the API.")
    name: str | None = Field(default=None, description="From --pods-file or the API.")
    qos_class: Literal["Guaranteed", "Burstable", "BestEffort"] | None = Field(
        description="From the cgroup path's QoS level (none: Guaranteed); null when a "
        "cgroup namespace hides it."
    )
    memory_bytes: int = Field(description="memory.current (v1: memory.usage_in_bytes).")
    limit_bytes: int | None = Field(
        description="memory.max (v1: memory.limit_in_bytes); null when unlimited."
    )
    anon_bytes: int = Field(description="memory.stat anon (v1: total_rss).")
    file_bytes: int = Field(
        description="memory.stat file (v1: total_cache): page cache, tmpfs and shmem included."
    )
    shmem_bytes: int = Field(
        description="memory.stat shmem (v1: total_shmem): tmpfs, memory-backed emptyDir and "
        "SysV pages charged to the pod."
    )
    oom_kills: int | None = Field(
        description="memory.events oom_kill (v1: memory.oom_control oom_kill over its live "
        "cgroups); null when the kernel does not count them."
    )
    pressure_some10s: float | None = Field(
        # to_camel would say "pressureSome10S"; the field keeps its Python name for callers.
        validation_alias="pressureSome10s",
        serialization_alias="pressureSome10s",
        description="memory.pressure `some` avg10 (percent); null on v1 or without PSI.",
    )


class HostReport(ReportModel):
    warnings: list[str] = Field(
        default_factory=list,
        description="Why some numbers cannot be true (e.g. Shmem above MemTotal): a corrupt "
        "or foreign /proc. Empty when the numbers are plausible.",
    )
    memory: MemorySummary
    shmem: ShmemSummary
    oom: OomPreview | None = None
    unreadable_processes: int = Field(
        description="Processes whose fds, maps or namespaces could not be read."
    )
    unreadable: list[UnreadableEntry] = Field(
        default_factory=list, description="The first few refusals, for diagnosis."
    )
    processes: ProcessSummary | None = Field(
        default=None, description="Only with --processes: absent from the document otherwise."
    )
    pods: list[PodMemoryItem] = Field(
        default_factory=list, description="The pods using the most memory, largest first."
    )

    @model_serializer(mode="wrap")
    def _without_unasked_processes(self, handler: SerializerFunctionWrapHandler) -> Any:
        # The default document keeps its shape: no `processes: null` for those not asking.
        data = handler(self)
        if self.processes is None and isinstance(data, dict):
            data.pop("processes", None)
        return data


TmpfsState = Literal[
    "Applied",
    "Unchanged",
    "Planned",
    "Refused",
    "NotTmpfs",
    "NotFound",
    "Failed",
    "Overridden",
    "Restored",
    "RestoreRefused",
]


class PolicyRef(ReportModel):
    name: str
    generation: int


class TmpfsStatus(ReportModel):
    """One tmpfs mount a policy item named, and what became of its limit."""

    path: str = Field(description="Mount point, as its mount namespace sees it.")
    pattern: str = Field(
        description="The policy item's path (exact or glob) that matched; podShm for a pod "
        "/dev/shm item."
    )
    pod: str | None = Field(
        default=None, description="podShm items: the pod (namespace/name) whose /dev/shm it is."
    )
    policy: str
    state: TmpfsState = Field(
        description="Overridden: another item covering this mount wins (the message names "
        "it); informational, not a failure. Restored: no item holds this mount any more and "
        "its original size and nrInodes were put back; RestoreRefused: the kernel refused "
        "them (message; tried again)."
    )
    message: str = ""
    size_bytes: int | None = Field(default=None, description="Size limit now in force.")
    used_bytes: int | None = None
    desired_bytes: int | None = Field(
        default=None, description="The limit the policy asks for (raised by headroom)."
    )


class HeldOpenFile(ReportModel):
    path: str
    bytes: int
    pids: list[ProcessRef]


CleanupState = Literal["Completed", "Incomplete", "Failed"]
CleanupPatternState = Literal["Walked", "Skipped", "Incomplete", "Failed"]


class CleanupPatternStatus(ReportModel):
    """What became of one of a rule's paths."""

    pattern: str
    state: CleanupPatternState = Field(
        description="Walked; Skipped: its literal directory does not exist, is not a directory "
        "or is not on a tmpfs, so it can do nothing; Incomplete: directories it matches are "
        "other mounts, not entered; Failed: its directory could not be opened safely."
    )
    message: str = ""


class CleanupStatus(ReportModel):
    """What one cleanup rule did in its last run (or would do, when dry-run)."""

    name: str
    policy: str
    state: CleanupState = Field(
        default="Completed",
        description="Completed; Incomplete: a path not Walked, or errors; Failed: the run "
        "failed (message) or a path Failed.",
    )
    message: str = Field(default="", description="Why the run failed, when it did.")
    dry_run: bool = False
    last_run: str | None = Field(default=None, description="RFC 3339 time of the last run.")
    next_run: str | None = Field(default=None, description="RFC 3339 time of the next run.")
    files_removed: int = 0
    bytes_removed: int = 0
    dirs_removed: int = 0
    held_open_files: int = 0
    held_open_bytes: int = 0
    held_open: list[HeldOpenFile] = Field(
        default_factory=list, description="The first files kept because a process holds them."
    )
    would_remove: list[str] = Field(
        default_factory=list, description="Dry run: the first paths it would remove."
    )
    locked: list[str] = Field(
        default_factory=list,
        description="Directories kept with everything below them because a process holds a "
        "BSD flock lock on them (as systemd-tmpfiles does).",
    )
    errors: list[str] = Field(default_factory=list)
    patterns: list[CleanupPatternStatus] = Field(
        default_factory=list, description="Each path of the rule and what became of it."
    )


class OomCounts(ReportModel):
    """What became of the processes oom rules matched."""

    matched: int = 0
    adjusted: int = 0
    unchanged: int = 0
    forbidden: int = 0
    failed: int = 0
    planned: int = Field(default=0, description="Dry run: processes that would be adjusted.")
    vanished: int = Field(
        default=0,
        description="Not written: the process exited, or its pid named another process, "
        "between match and write. Not a failure.",
    )
    restored: int = Field(
        default=0,
        description="Processes no rule matches any more whose original oom_score_adj was "
        "put back (not among matched).",
    )
    restore_refused: int = Field(
        default=0, description="Originals the kernel refused to put back (tried again)."
    )


class OomRuleStatus(OomCounts):
    name: str
    policy: str


class OomFailure(ReportModel):
    pid: int
    comm: str
    rule: str
    state: str = Field(
        description="Forbidden, Failed, RestoreRefused, or Vanished (not a failure); in "
        "`restores` also Restored."
    )
    message: str


class OomStatus(OomCounts):
    """oom_score_adj rules: how many processes matched and what became of them."""

    rules: list[OomRuleStatus] = Field(default_factory=list)
    failures: list[OomFailure] = Field(
        default_factory=list, description="The first processes that were not adjusted."
    )
    restores: list[OomFailure] = Field(
        default_factory=list,
        description="The first processes whose original oom_score_adj was put back "
        "(Restored) or refused (RestoreRefused); `rule` is the one that had changed it.",
    )
    predicted_victims: list[PredictedVictim] = Field(
        default_factory=list, description="Node report: the next OOM victims, next first."
    )
    badness_truncation_risk: bool = False
    futile: list[FutileOom] = Field(
        default_factory=list,
        description="Node report: memory cgroups where OOM kills free nothing (OOMLoopRisk).",
    )


class ApplyReport(ReportModel):
    """`nodemem apply --json`: the policies in force and every item's state."""

    policies: list[PolicyRef]
    dry_run: bool
    tmpfs: list[TmpfsStatus]
    cleanup: list[CleanupStatus]
    oom: OomStatus
