"""Plain-text tables for the CLI."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from nodemem.api.quantity import format_bytes
from nodemem.api.report import (
    ApplyReport,
    FutileOom,
    HostReport,
    MemorySummary,
    PodMemoryItem,
    PredictedVictim,
    ProcessSummary,
)
from nodemem.host.identity import parse_cgroup_path

MAX_CELL = 60

# Control, format (bidi overrides), line and paragraph separators: a file or process
# name carrying one could forge a line or reorder a column on the terminal.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text: str) -> str:
    """`text` with every character that moves the cursor or hides text escaped."""
    if text.isprintable():
        return text
    return "".join(
        _escape(ch) if unicodedata.category(ch) in _HIDDEN_CATEGORIES else ch for ch in text
    )


def _escape(ch: str) -> str:
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _cell(value: object) -> str:
    text = visible(str(value))
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += [
        indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    ]
    return "\n".join(line.rstrip() for line in lines)


def host_report_text(report: HostReport) -> str:
    mem = report.memory
    shmem = report.shmem
    out = [f"WARNING: {warning}" for warning in report.warnings]
    out += [
        f"Memory: {format_bytes(mem.total_bytes)} total, "
        f"{format_bytes(mem.available_bytes)} available",
        table(
            ("WHERE", "BYTES", "WHAT"),
            [
                (
                    "processes (RSS sum)",
                    format_bytes(mem.process_rss_bytes),
                    "what top shows; shared pages counted once per process",
                ),
                (
                    "Shmem",
                    format_bytes(mem.shmem_bytes),
                    "tmpfs, SysV, memfd, shared anonymous: no process owns it",
                ),
                (
                    "Slab",
                    format_bytes(mem.slab_bytes),
                    f"kernel caches: {format_bytes(mem.slab_reclaimable_bytes)} reclaimable, "
                    f"{format_bytes(mem.slab_unreclaimable_bytes)} not",
                ),
                ("KernelStack", format_bytes(mem.kernel_stack_bytes), "kernel"),
                ("PageTables", format_bytes(mem.page_tables_bytes), "kernel"),
                ("VmallocUsed", format_bytes(mem.vmalloc_used_bytes), "kernel"),
            ],
        ),
        *_counters_lines(mem),
        "",
        f"Shmem: {format_bytes(shmem.total_bytes)} = "
        f"{format_bytes(shmem.attributed_bytes)} attributed + "
        f"{format_bytes(shmem.unaccounted_bytes)} unaccounted",
        "  by kind: "
        + ", ".join(
            f"{name} {format_bytes(value)}"
            for name, value in shmem.by_kind.model_dump(by_alias=True).items()
        ),
    ]
    if shmem.top:
        out += [
            "",
            table(
                ("KIND", "BYTES", "NAME", "POD", "PROCESSES", "NOTE"),
                [
                    (
                        item.kind,
                        format_bytes(item.bytes),
                        item.name,
                        item.pod or "",
                        ", ".join(f"{p.pid} {p.comm}" for p in item.pids),
                        item.note,
                    )
                    for item in shmem.top
                ],
            ),
        ]
    if shmem.deleted_open_files:
        out += [
            "",
            "Deleted but still open (their bytes are inside their tmpfs above):",
            table(
                ("BYTES", "PID", "COMM", "PATH"),
                [
                    (format_bytes(f.bytes), str(f.pid), f.comm, f.path)
                    for f in shmem.deleted_open_files
                ],
            ),
        ]
    if report.pods:
        out += ["", *_pods_text(report.pods)]
    if report.oom is not None:
        oom = report.oom
        scope = "a node-wide OOM" if oom.scope == "node" else f"an OOM in memory cgroup {oom.scope}"
        out += [
            "",
            f"Next OOM victims in {scope} (kernel formula: rss+swap+pagetables pages + "
            f"adj x {oom.total_pages // 1000}):",
            table(
                ("#", "PID", "COMM", "ADJ", "SCORE", "RSS", "POD"),
                [
                    (
                        str(rank),
                        str(v.pid),
                        v.comm,
                        str(v.oom_score_adj),
                        str(v.score),
                        format_bytes(v.rss_bytes),
                        v.pod or "",
                    )
                    for rank, v in enumerate(oom.predicted_victims, start=1)
                ],
            ),
            *_group_kill_lines(oom.predicted_victims),
        ]
        if oom.badness_truncation_risk:
            out.append(
                "  WARNING: kernel before 5.9 with negative oom_score_adj: every score <= 0 "
                "ties at 1 and scan order, not size, picks the victim"
            )
        if oom.futile:
            out += ["", *_futile_text(oom.futile)]
    if report.processes is not None:
        out += ["", *_processes_text(report.processes)]
    if report.unreadable_processes:
        out += [
            "",
            f"Unreadable processes: {report.unreadable_processes} "
            "(their fds or mappings are not attributed; their Shmem shows as unaccounted)",
            table(
                ("PID", "COMM", "WHAT", "REASON"),
                [(str(u.pid), u.comm, u.what, u.reason) for u in report.unreadable],
            ),
        ]
    return "\n".join(out)


def _counters_lines(mem: MemorySummary) -> list[str]:
    """PSI and the kernel's OOM kill count, where the kernel has them."""
    parts = []
    if mem.pressure is not None:
        for kind, line in (("some", mem.pressure.some), ("full", mem.pressure.full)):
            if line is not None:
                parts.append(f"{kind} {line.avg10:.2f}% (10 s) {line.avg60:.2f}% (60 s)")
    pressure = "memory pressure " + ", ".join(parts) if parts else "no PSI"
    kills = "" if mem.oom_kills is None else f"; {mem.oom_kills} OOM kills since boot"
    return [f"  {pressure}{kills}"]


def _futile_text(futile: Sequence[FutileOom]) -> list[str]:
    rows = []
    for f in futile:
        holders = ", ".join(f"{h.name} {format_bytes(h.bytes)}" for h in f.holders[:4])
        rows.append(
            (
                f.pod or f.cgroup,
                format_bytes(f.usage_bytes),
                format_bytes(f.limit_bytes),
                format_bytes(f.shmem_bytes),
                format_bytes(f.freeable_bytes),
                "" if f.oom_kills is None else str(f.oom_kills),
                holders,
            )
        )
    return [
        "OOM kills that free nothing (the memory cgroup is near its limit with mostly Shmem, "
        "which outlives every task; FREEABLE: the most a kill gives back):",
        table(("CGROUP", "USAGE", "LIMIT", "SHMEM", "FREEABLE", "KILLS", "HELD BY"), rows),
    ]


def _processes_text(summary: ProcessSummary) -> list[str]:
    total = summary.total
    rows = [
        (
            str(p.pid),
            p.comm,
            format_bytes(p.uss_bytes),
            format_bytes(p.pss_bytes),
            format_bytes(p.rss_bytes),
            _size(p.pss_shmem_bytes),
            p.pod or "",
        )
        for p in summary.top
    ]
    rows.append(
        (
            "",
            f"total ({total.processes} processes)",
            format_bytes(total.uss_bytes),
            format_bytes(total.pss_bytes),
            format_bytes(total.rss_bytes),
            format_bytes(total.pss_shmem_bytes),
            "",
        )
    )
    out = [
        "Processes by PSS (USS: only theirs, freed when they exit; PSS: shared pages split "
        "among their users; SHMEM: their PSS share of Shmem):",
        table(("PID", "COMM", "USS", "PSS", "RSS", "SHMEM", "POD"), rows),
    ]
    if summary.unreadable_processes:
        out += [
            f"  smaps_rollup not read: {summary.unreadable_processes} (not in the total)",
            table(
                ("PID", "COMM", "REASON"),
                [(str(u.pid), u.comm, u.reason) for u in summary.unreadable],
                indent="    ",
            ),
        ]
    return out


def _group_kill_lines(victims: Sequence[PredictedVictim]) -> list[str]:
    """One line per victim whose kill is a group kill (memory.oom.group, v2)."""
    out = []
    for rank, v in enumerate(victims, start=1):
        if v.oom_group is None:
            continue
        count = 1 + len(v.killed_with)
        processes = "process" if count == 1 else "processes"
        out.append(
            f"  #{rank} (pid {v.pid}) kills {count} {processes} of "
            f"{visible(_group_name(v))}, {v.group_rss_bytes / (1 << 20):.0f} MiB "
            "(memory.oom.group)"
        )
    return out


def _group_name(victim: PredictedVictim) -> str:
    """pod/container, the pod, or the cgroup path when it is neither."""
    assert victim.oom_group is not None
    found = parse_cgroup_path(victim.oom_group)
    if found.pod_uid is None:
        return victim.oom_group
    pod = victim.pod or found.pod_uid  # the victim is inside the group: the same pod
    return f"{pod}/{found.container_id[:12]}" if found.container_id else pod


def _pods_text(pods: Sequence[PodMemoryItem]) -> list[str]:
    rows = [
        (
            f"{p.namespace}/{p.name}" if p.name else p.uid,
            p.qos_class or "?",
            format_bytes(p.memory_bytes),
            "none" if p.limit_bytes is None else format_bytes(p.limit_bytes),
            format_bytes(p.anon_bytes),
            format_bytes(p.file_bytes),
            format_bytes(p.shmem_bytes),
            "" if p.oom_kills is None else str(p.oom_kills),
            "" if p.pressure_some10s is None else f"{p.pressure_some10s:.2f}%",
        )
        for p in pods
    ]
    return [
        "Pods by memory (their cgroup's charge; SHMEM: tmpfs, emptyDir and SysV pages "
        "charged to them, inside FILE):",
        table(
            ("POD", "QOS", "MEMORY", "LIMIT", "ANON", "FILE", "SHMEM", "OOM KILLS", "PRESSURE"),
            rows,
        ),
    ]


def _size(value: int | None) -> str:
    return "" if value is None else format_bytes(value)


def apply_report_text(
    report: ApplyReport, *, cleanup_skipped: bool = False, heading: str | None = None
) -> str:
    policies = ", ".join(f"{p.name} (generation {p.generation})" for p in report.policies)
    out = [
        ("DRY RUN: nothing was changed. " if report.dry_run else "")
        + (heading or f"Policies selecting this node: {policies or 'none'}")
    ]
    if report.tmpfs:
        out += [
            "",
            "tmpfs limits:",
            table(
                ("PATH", "STATE", "SIZE", "USED", "WANTED", "POLICY", "MESSAGE"),
                [
                    (
                        t.path if t.pod is None else f"{t.path} ({t.pod})",
                        t.state,
                        _size(t.size_bytes),
                        _size(t.used_bytes),
                        _size(t.desired_bytes),
                        t.policy,
                        t.message,
                    )
                    for t in report.tmpfs
                ],
            ),
        ]
    if report.cleanup:
        out += [
            "",
            "cleanup:",
            table(
                ("RULE", "POLICY", "STATE", "REMOVED", "FREED", "HELD OPEN", "ERRORS"),
                [
                    (
                        c.name,
                        c.policy,
                        c.state,
                        f"{c.files_removed} files" + (" (would)" if c.dry_run else ""),
                        format_bytes(c.bytes_removed),
                        f"{c.held_open_files} files, {format_bytes(c.held_open_bytes)}",
                        str(len(c.errors)),
                    )
                    for c in report.cleanup
                ],
            ),
        ]
        for c in report.cleanup:
            if c.message:
                out.append(visible(f"  {c.name}: {c.state}: {c.message}"))
            out += [
                visible(f"  {c.name}: {p.pattern}: {p.state}: {p.message}")
                for p in c.patterns
                if p.state != "Walked"
            ]
            out += [visible(f"  {c.name}: would remove {path}") for path in c.would_remove]
            out += [
                visible(f"  {c.name}: kept {path} and everything below it: locked (flock)")
                for path in c.locked
            ]
            out += [
                visible(
                    f"  {c.name}: kept {f.path} ({format_bytes(f.bytes)}), held open by "
                    + ", ".join(f"{p.pid} {p.comm}" for p in f.pids)
                )
                for f in c.held_open
            ]
            out += [visible(f"  {c.name}: error: {error}") for error in c.errors]
    elif cleanup_skipped:
        out += [
            "",
            "cleanup rules were not run (they run on schedule; --run-cleanup runs them now)",
        ]
    if report.oom.rules:
        oom = report.oom
        out += [
            "",
            f"oom_score_adj: {oom.matched} processes matched, {oom.adjusted} adjusted, "
            f"{oom.unchanged} unchanged, {oom.forbidden} forbidden, {oom.failed} failed"
            + (f", {oom.planned} would be adjusted" if oom.planned else "")
            + (f", {oom.vanished} vanished before the write" if oom.vanished else ""),
            table(
                ("RULE", "POLICY", "MATCHED", "ADJUSTED", "UNCHANGED", "FORBIDDEN", "FAILED"),
                [
                    (
                        r.name,
                        r.policy,
                        str(r.matched),
                        str(r.adjusted + r.planned) + (" (would)" if r.planned else ""),
                        str(r.unchanged),
                        str(r.forbidden),
                        str(r.failed),
                    )
                    for r in oom.rules
                ],
            ),
        ]
        out += [
            visible(f"  {f.rule}: pid {f.pid} {f.comm}: {f.state}: {f.message}")
            for f in oom.failures
        ]
    out += _restores_text(report)
    return "\n".join(out)


def _restores_text(report: ApplyReport) -> list[str]:
    """Originals put back (undo): processes no rule matches any more."""
    oom = report.oom
    if not oom.restores:
        return []
    return [
        "",
        f"oom_score_adj originals: {oom.restored} restored, {oom.restore_refused} refused",
        *(
            visible(f"  pid {r.pid} {r.comm} (rule {r.rule}): {r.state}: {r.message}")
            for r in oom.restores
        ),
    ]
