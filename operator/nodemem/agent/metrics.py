"""Prometheus metrics and the health endpoints of the agent, on one port.

Series (all gauges reflect the last cycle; counters accumulate since start):
  nodemem_memory_bytes{part}                /proc/meminfo and the process table: total,
                                            available, shmem, slabReclaimable,
                                            slabUnreclaimable, kernelStack, pageTables,
                                            vmallocUsed, processRss (sum of VmRSS)
  nodemem_shmem_bytes{kind}                 Shmem attributed by kind
  nodemem_shmem_unaccounted_bytes           Shmem in no known object
  nodemem_shmem_object_bytes{kind,name,pod} the --metrics-top-objects largest objects
                                            (same kind, name and pod summed)
  nodemem_deleted_open_bytes                unlinked tmpfs files still held open
  nodemem_orphan_sysv_segments              SysV segments attached nowhere (nattch 0)
  nodemem_orphan_sysv_bytes                 their bytes
  nodemem_tmpfs_mounts                      measured tmpfs superblocks (all of them)
  nodemem_tmpfs_mount_size_bytes{path,dev}  size limit of each (0: unlimited), the
  nodemem_tmpfs_mount_used_bytes{path,dev}  use of each: the MAX_TMPFS_MOUNTS most used
  nodemem_tmpfs_size_bytes{path}            tmpfs limit in force (mounts a policy names)
  nodemem_tmpfs_used_bytes{path}            tmpfs use (mounts a policy names)
  nodemem_tmpfs_limit_state{path,policy,state}  1 per policy item and mount: Applied,
                                            Unchanged, Planned, Refused, Failed, ...
  nodemem_oom_kills_total                   the kernel's OOM kills since boot (vmstat)
  nodemem_memory_pressure_seconds_total{kind}  PSI memory stall time, some/full
                                            (absent where the kernel has no PSI)
  nodemem_memory_pressure_avg10{kind}       PSI avg10 and avg60 (percent), some/full
  nodemem_memory_pressure_avg60{kind}       (absent where the kernel has no PSI)
  nodemem_pod_oom_kills_total{pod}          OOM kills in a pod's cgroup (memory.events),
                                            the MAX_POD_SERIES pods with most kills
  nodemem_oom_futile_cgroups                memory cgroups where a kill frees nothing
  nodemem_oom_loop_kills{cgroup,pod}        kills seen in each of them (the first 20)
  nodemem_cleanup_freed_bytes_total{rule}   bytes removed by cleanups
  nodemem_cleanup_held_open_files{rule}     files kept because a process holds them
  nodemem_oom_adjustments_total{rule}       oom_score_adj writes
  nodemem_oom_failures_total{rule}          Forbidden or Failed writes
  nodemem_scan_duration_seconds             last attribution pass
  nodemem_api_errors_total{operation}       failed Kubernetes API calls
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from nodemem.api.report import ApplyReport, HostReport, printable
from nodemem.host.memcg import OomLoopWatch
from nodemem.host.mounts import dev_string
from nodemem.host.oom_predict import predict_victims
from nodemem.host.paths import HostPaths
from nodemem.host.podmem import PodMemory, read_pod_memory
from nodemem.host.shmem import NodeScan, ShmemTracker
from nodemem.host.vmstat import read_memory_pressure, read_oom_kills, read_pressure_lines
from nodemem.policy.apply import ApplyResult
from nodemem.policy.effective import EffectivePolicy
from nodemem.policy.pods import PodDirectory
from nodemem.policy.report import (
    apply_report,
    futile_items,
    host_report,
    node_counters,
    oom_preview,
    pod_memory_items,
)

if TYPE_CHECKING:
    from nodemem.agent.loop import NodeAgent

log = logging.getLogger("nodemem.agent.metrics")

# Cardinality bounds: a node may have thousands of tmpfs mounts (a projected-token tmpfs
# per pod, a /dev/shm per container) and any number of Shmem objects. Label values are
# names chosen by anyone who can create a file, mount or memfd: made valid UTF-8 and
# cut to MAX_LABEL_CHARS (prometheus_client escapes quotes, backslashes and newlines).
DEFAULT_TOP_OBJECTS = 20
MAX_TMPFS_MOUNTS = 200
MAX_LABEL_CHARS = 512
MAX_POD_SERIES = 100
MAX_FUTILE_SERIES = 20
MEMORY_PARTS = {  # nodemem_memory_bytes{part}: the MemorySummary field behind each part
    "total": "total_bytes",
    "available": "available_bytes",
    "shmem": "shmem_bytes",
    "slabReclaimable": "slab_reclaimable_bytes",
    "slabUnreclaimable": "slab_unreclaimable_bytes",
    "kernelStack": "kernel_stack_bytes",
    "pageTables": "page_tables_bytes",
    "vmallocUsed": "vmalloc_used_bytes",
    "processRss": "process_rss_bytes",
}


def label(text: str) -> str:
    """A host-chosen name as a label value: valid UTF-8, at most MAX_LABEL_CHARS."""
    text = printable(text)
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "\u2026"


class _Snapshot:
    """Series whose label sets come and go (mounts, objects, states), replaced whole every
    cycle: a series that is gone is gone from the next scrape, and a scrape never sees
    half of a cycle (the list is swapped in one assignment)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> list[Metric]:
        return self.families


class AgentMetrics:
    def __init__(self, top_objects: int = DEFAULT_TOP_OBJECTS) -> None:
        self.top_objects = top_objects
        self.registry = CollectorRegistry()
        r = self.registry
        self.memory = Gauge(
            "nodemem_memory_bytes", "Where the node's memory is, by part", ["part"], registry=r
        )
        self.deleted_open = Gauge(
            "nodemem_deleted_open_bytes",
            "Unlinked tmpfs files still held open or mapped (inside their tmpfs's use)",
            registry=r,
        )
        self.orphan_segments = Gauge(
            "nodemem_orphan_sysv_segments", "SysV segments attached nowhere (nattch 0)", registry=r
        )
        self.orphan_bytes = Gauge(
            "nodemem_orphan_sysv_bytes", "Bytes of SysV segments attached nowhere", registry=r
        )
        self.tmpfs_mounts = Gauge(
            "nodemem_tmpfs_mounts", "tmpfs superblocks measured (series: the most used)", registry=r
        )
        self._scan_series = _Snapshot()
        self._apply_series = _Snapshot()
        self._pod_series = _Snapshot()
        r.register(self._scan_series)
        r.register(self._apply_series)
        r.register(self._pod_series)
        self.shmem = Gauge("nodemem_shmem_bytes", "Shmem attributed, by kind", ["kind"], registry=r)
        self.unaccounted = Gauge(
            "nodemem_shmem_unaccounted_bytes", "Shmem in no known object", registry=r
        )
        self.tmpfs_size = Gauge(
            "nodemem_tmpfs_size_bytes", "tmpfs size limit in force", ["path"], registry=r
        )
        self.tmpfs_used = Gauge("nodemem_tmpfs_used_bytes", "tmpfs use", ["path"], registry=r)
        self.cleanup_freed = Counter(
            "nodemem_cleanup_freed_bytes", "Bytes removed by cleanups", ["rule"], registry=r
        )
        self.cleanup_held = Gauge(
            "nodemem_cleanup_held_open_files",
            "Files a cleanup kept because a process holds them open",
            ["rule"],
            registry=r,
        )
        self.oom_adjusted = Counter(
            "nodemem_oom_adjustments", "oom_score_adj writes", ["rule"], registry=r
        )
        self.oom_failures = Counter(
            "nodemem_oom_failures", "oom_score_adj writes refused or failed", ["rule"], registry=r
        )
        self.scan_duration = Gauge(
            "nodemem_scan_duration_seconds", "Duration of the last attribution pass", registry=r
        )
        self.api_errors = Counter(
            "nodemem_api_errors", "Failed Kubernetes API calls", ["operation"], registry=r
        )

    def observe_host(self, report: HostReport, scan_seconds: float) -> None:
        for kind, value in report.shmem.by_kind.model_dump(by_alias=True).items():
            self.shmem.labels(kind=kind).set(value)
        self.unaccounted.set(report.shmem.unaccounted_bytes)
        self.scan_duration.set(scan_seconds)
        for part, attribute in MEMORY_PARTS.items():
            self.memory.labels(part=part).set(getattr(report.memory, attribute))

    def observe_scan(
        self, scan: NodeScan, pods: PodDirectory, paths: HostPaths | None = None
    ) -> None:
        """The per-mount and per-object series, and the kernel's own counters."""
        shmem = scan.shmem
        self.deleted_open.set(sum(entry.bytes for entry in shmem.deleted_open_files))
        orphans = [obj for obj in shmem.objects if obj.orphan]
        self.orphan_segments.set(len(orphans))
        self.orphan_bytes.set(sum(obj.bytes for obj in orphans))
        self.tmpfs_mounts.set(len(scan.tmpfs_mounts))

        def pod_name(uid: str | None) -> str:
            pod = pods.get(uid)
            return f"{pod.namespace}/{pod.name}" if pod else uid or ""

        size = GaugeMetricFamily(
            "nodemem_tmpfs_mount_size_bytes",
            f"tmpfs size limit (0: unlimited), the {MAX_TMPFS_MOUNTS} most used mounts",
            labels=["path", "dev"],
        )
        used = GaugeMetricFamily(
            "nodemem_tmpfs_mount_used_bytes",
            f"tmpfs use, the {MAX_TMPFS_MOUNTS} most used mounts",
            labels=["path", "dev"],
        )
        # dev keeps apart superblocks of one name (every container's /dev/shm).
        ranked = sorted(scan.tmpfs_mounts, key=lambda m: (-m.used, m.name, m.dev))
        for mount in ranked[:MAX_TMPFS_MOUNTS]:
            labels = [label(mount.name), dev_string(mount.dev)]
            size.add_metric(labels, mount.size)
            used.add_metric(labels, mount.used)
        # Objects of one kind and name in one pod are summed (every /dev/zero mapping,
        # a name cut short): one series each, never a duplicate.
        summed: Tally[tuple[str, str, str]] = Tally()
        for obj in shmem.objects:
            summed[(obj.kind, label(obj.name), label(pod_name(obj.pod)))] += obj.bytes
        objects = GaugeMetricFamily(
            "nodemem_shmem_object_bytes",
            f"The {self.top_objects} largest Shmem objects",
            labels=["kind", "name", "pod"],
        )
        for key, value in sorted(summed.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(objects.samples) >= self.top_objects:
                break
            objects.add_metric(list(key), value)
        families: list[Metric] = [size, used, objects]
        oom_kills = read_oom_kills(paths) if paths is not None else None
        if oom_kills is not None:
            families.append(
                CounterMetricFamily(
                    "nodemem_oom_kills", "OOM kills since boot (/proc/vmstat)", value=oom_kills
                )
            )
        pressure = read_memory_pressure(paths) if paths is not None else None
        if pressure is not None:
            stalls = CounterMetricFamily(
                "nodemem_memory_pressure_seconds",
                "Time tasks stalled on memory since boot (PSI: some, full)",
                labels=["kind"],
            )
            for kind, seconds in sorted(pressure.items()):
                stalls.add_metric([kind], seconds)
            families.append(stalls)
        lines = read_pressure_lines(paths) if paths is not None else None
        if lines is not None:
            for window in ("avg10", "avg60"):
                gauge = GaugeMetricFamily(
                    f"nodemem_memory_pressure_{window}",
                    f"Percent of the last {window[3:]} s tasks stalled on memory (PSI)",
                    labels=["kind"],
                )
                for kind, line in sorted(lines.items()):
                    gauge.add_metric([kind], getattr(line, window))
                families.append(gauge)
        self._scan_series.families = families

    def observe_pods(self, memory: list[PodMemory], pods: PodDirectory, report: HostReport) -> None:
        """Per-pod OOM kills (bounded: the pods with most kills, then most memory) and the
        memcgs where a kill frees nothing."""
        kills = CounterMetricFamily(
            "nodemem_pod_oom_kills",
            f"OOM kills in the pod's cgroup (memory.events), at most {MAX_POD_SERIES} pods",
            labels=["pod"],
        )
        counted = [m for m in memory if m.oom_kills is not None]
        counted.sort(key=lambda m: (-(m.oom_kills or 0), -m.memory_bytes, m.uid))
        for pod in counted[:MAX_POD_SERIES]:
            info = pods.get(pod.uid)
            name = f"{info.namespace}/{info.name}" if info else pod.uid
            kills.add_metric([label(name)], pod.oom_kills or 0)
        futile = report.oom.futile if report.oom is not None else []
        count = GaugeMetricFamily(
            "nodemem_oom_futile_cgroups",
            "Memory cgroups near their limit with mostly Shmem: a kill frees nothing",
            value=len(futile),
        )
        loops = GaugeMetricFamily(
            "nodemem_oom_loop_kills",
            "OOM kills the agent saw in such a memory cgroup (2 or more: a loop)",
            labels=["cgroup", "pod"],
        )
        for item in futile[:MAX_FUTILE_SERIES]:
            loops.add_metric([label(item.cgroup), label(item.pod or "")], item.loop_kills)
        self._pod_series.families = [kills, count, loops]

    def observe_apply(self, report: ApplyReport) -> None:
        states = GaugeMetricFamily(
            "nodemem_tmpfs_limit_state",
            "1 for the state of each policy tmpfs item on each mount it resolves to",
            labels=["path", "policy", "state"],
        )
        # One state per mount and policy: two items of one policy on one mount show the
        # winner's (the other is Overridden).
        by_mount: dict[tuple[str, str], str] = {}
        for item in report.tmpfs:
            key = (label(item.path), label(item.policy))
            if by_mount.get(key, "Overridden") == "Overridden":
                by_mount[key] = item.state
        for key, state in by_mount.items():
            states.add_metric([*key, state], 1)
        self._apply_series.families = [states]
        for item in report.tmpfs:
            if item.size_bytes is not None:
                self.tmpfs_size.labels(path=item.path).set(item.size_bytes)
            if item.used_bytes is not None:
                self.tmpfs_used.labels(path=item.path).set(item.used_bytes)
        for rule in report.oom.rules:
            self.oom_adjusted.labels(rule=rule.name).inc(rule.adjusted)
            self.oom_failures.labels(rule=rule.name).inc(rule.forbidden + rule.failed)

    def observe_cleanup(self, rule: str, freed_bytes: int, held_open: int, dry_run: bool) -> None:
        if not dry_run:
            self.cleanup_freed.labels(rule=rule).inc(freed_bytes)
        self.cleanup_held.labels(rule=rule).set(held_open)

    def observe_exec_adjustments(self, rule: str, count: int, *, failed: bool) -> None:
        (self.oom_failures if failed else self.oom_adjusted).labels(rule=rule).inc(count)


class CycleMetrics:
    """After every cycle of the loop: attribute Shmem again and update the metrics.

    The standalone agent's `on_cycle`; the cluster agent's Reporter also writes the
    node's report from what `observe` returns.
    """

    def __init__(self, metrics: AgentMetrics, paths: HostPaths) -> None:
        self.metrics = metrics
        self.paths = paths
        self.tracker = ShmemTracker(paths)  # re-reads only changed processes, all every 10
        self.oom_loops = OomLoopWatch()  # oom_kill of futile memcgs across cycles
        self._exec_counts: dict[str, Tally[str]] = {}
        self._cleanup_runs: dict[str, str | None] = {}

    def __call__(self, agent: NodeAgent) -> None:
        self.observe(agent)

    def observe(self, agent: NodeAgent) -> tuple[EffectivePolicy, ApplyResult, HostReport]:
        effective = agent.state.effective or EffectivePolicy((), (), (), (), None)
        applied = agent.state.last_apply or ApplyResult()
        started = time.perf_counter()
        scan = self.tracker.scan()
        prediction = predict_victims(self.paths, statuses=scan.processes)
        preview = oom_preview(self.paths, prediction, agent.pods)
        pod_memory = read_pod_memory(self.paths)
        pods = pod_memory_items(pod_memory, agent.pods, 10)
        preview.futile = futile_items(self.oom_loops.observe(self.paths, scan), agent.pods)
        pressure, oom_kills = node_counters(self.paths)
        host = host_report(
            scan, top=10, oom=preview, pods=pods, pressure=pressure, oom_kills=oom_kills
        )
        self.metrics.observe_host(host, time.perf_counter() - started)
        self.metrics.observe_scan(scan, agent.pods, self.paths)
        self.metrics.observe_pods(pod_memory, agent.pods, host)
        self.metrics.observe_apply(apply_report(effective, applied, dry_run=agent.settings.dry_run))
        self._observe_exec(agent)
        self._observe_cleanups(agent)
        return effective, applied, host

    def _observe_exec(self, agent: NodeAgent) -> None:
        for rule, states in agent.state.exec_oom.per_rule.items():
            seen = self._exec_counts.setdefault(rule, Tally())
            for state, count in states.items():
                new = count - seen[state]
                if new and state in ("Adjusted", "Forbidden", "Failed"):  # not Unchanged
                    self.metrics.observe_exec_adjustments(rule, new, failed=state != "Adjusted")
            self._exec_counts[rule] = Tally(states)

    def _observe_cleanups(self, agent: NodeAgent) -> None:
        for name, status in agent.state.cleanups.items():
            if self._cleanup_runs.get(name) != status.last_run:
                self._cleanup_runs[name] = status.last_run
                self.metrics.observe_cleanup(
                    name, status.bytes_removed, status.held_open_files, status.dry_run
                )


# The port is reachable by anyone who can reach the node: every client gets a bounded
# share. Beyond MAX_CONNECTIONS a new connection is closed at once; each connection has
# REQUEST_SECONDS from its accept for the request, the answer and the close.
MAX_CONNECTIONS = 64
REQUEST_SECONDS = 5.0
MAX_REQUEST_BYTES = 8192
_ACCEPTS_PER_WAKEUP = 256  # a connect storm must not keep the loop from its deadlines
_FULL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Connection:
    __slots__ = ("answered", "closed", "deadline", "inbox", "outbox", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.inbox = bytearray()
        self.outbox = memoryview(b"")
        self.answered = False
        self.closed = False


class MetricsServer:
    """/metrics, /healthz (the process answers) and /readyz (`ready()`) on one port.

    One thread, one selector, no thread per connection: a flood of clients costs a
    bounded number of sockets and never the enforcement loop's time. Every response
    closes its connection. A client that breaks off is logged at debug level only.
    """

    def __init__(
        self,
        metrics: AgentMetrics,
        ready: Callable[[], bool],
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_seconds: float = REQUEST_SECONDS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.max_connections = max_connections
        self.request_seconds = request_seconds
        self.max_request_bytes = max_request_bytes
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self._listener.setblocking(False)
        self.server_address: tuple[str, int] = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._connections: deque[_Connection] = deque()  # accept order is deadline order
        self._open = 0
        self._accept_paused_until: float | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def shutdown(self) -> None:
        """Stop serving and close every connection; returns within a second."""
        self._stopping.set()
        with contextlib.suppress(OSError):  # already woken, or already closed
            self._wake_w.send(b"x")
        self._thread.join(timeout=1.0)

    def server_close(self) -> None:
        self.shutdown()
        self._wake_w.close()

    # -- the event loop (its own thread) ------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                timeout = self._housekeeping(time.monotonic())
                for key, events in self._selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wakeups()
                    else:
                        self._service(key.data, events)
        except Exception:  # a bug here: /metrics goes, enforcement must not
            log.exception("metrics server stopped")
        finally:
            for connection in self._connections:
                self._close(connection)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()

    def _housekeeping(self, now: float) -> float | None:
        """Close connections past their deadline; the seconds until the next deadline."""
        while self._connections and (
            self._connections[0].closed or self._connections[0].deadline <= now
        ):
            connection = self._connections.popleft()
            if not connection.closed:
                log.debug("metrics client timed out")
                self._close(connection)
        waits: list[float] = []
        if self._connections:
            waits.append(self._connections[0].deadline - now)
        if self._accept_paused_until is not None:
            if now >= self._accept_paused_until:
                self._accept_paused_until = None
                self._selector.register(self._listener, selectors.EVENT_READ)
            else:
                waits.append(self._accept_paused_until - now)
        return max(0.0, min(waits)) if waits else None

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the listener would stay readable and spin.
                    log.warning("metrics: cannot accept (%s): pausing for 0.5 s", exc.strerror)
                    self._selector.unregister(self._listener)
                    self._accept_paused_until = time.monotonic() + 0.5
                    return
                continue  # that client is gone already (ECONNABORTED and the like)
            if self._open >= self.max_connections:
                self._refuse(sock)
                continue
            sock.setblocking(False)
            connection = _Connection(sock, time.monotonic() + self.request_seconds)
            self._selector.register(sock, selectors.EVENT_READ, connection)
            self._connections.append(connection)
            self._open += 1

    def _refuse(self, sock: socket.socket) -> None:
        try:
            sock.setblocking(False)
            sock.send(_FULL)  # best effort: a scraper learns why
            # Unread request bytes would turn the close into a reset that loses the 503.
            sock.recv(self.max_request_bytes)
        except OSError:
            pass
        sock.close()

    def _service(self, connection: _Connection, events: int) -> None:
        try:
            if events & selectors.EVENT_READ:
                self._read(connection)
            if not connection.closed and events & selectors.EVENT_WRITE:
                self._write(connection)
        except OSError as exc:  # ECONNRESET, EPIPE, ...: the client's business
            log.debug("metrics client: %s", exc)
            self._close(connection)

    def _read(self, connection: _Connection) -> None:
        data = connection.sock.recv(4096)
        if not data:  # the client closed: before its request ended, or after our answer
            self._close(connection)
            return
        if connection.answered:
            return  # discarded while the answer drains
        connection.inbox += data
        inbox = connection.inbox
        end = inbox.find(b"\r\n\r\n")
        if end < 0:
            end = inbox.find(b"\n\n")
        if end < 0 or end > self.max_request_bytes:
            if len(inbox) > self.max_request_bytes:
                self._answer(connection, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"too large\n")
            return
        self._respond(connection, bytes(inbox[:end]))

    def _respond(self, connection: _Connection, head: bytes) -> None:
        parts = head.split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._answer(connection, HTTPStatus.BAD_REQUEST, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            self._answer(connection, HTTPStatus.METHOD_NOT_ALLOWED, b"GET only\n")
            return
        path = target.split(b"?", 1)[0]
        head_only = method == b"HEAD"
        try:
            if path == b"/metrics":
                body = generate_latest(self.metrics.registry)
                self._answer(connection, HTTPStatus.OK, body, CONTENT_TYPE_LATEST, head_only)
            elif path == b"/healthz":
                self._answer(connection, HTTPStatus.OK, b"ok\n", head_only=head_only)
            elif path == b"/readyz":
                ok = self.ready()
                code = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
                body = b"ready\n" if ok else b"not ready\n"
                self._answer(connection, code, body, head_only=head_only)
            else:
                self._answer(connection, HTTPStatus.NOT_FOUND, b"not found\n", head_only=head_only)
        except OSError:
            raise
        except Exception:  # ours, not the client's: say so, keep serving
            log.exception("metrics: answering %s failed", path.decode("ascii", "replace"))
            self._answer(connection, HTTPStatus.INTERNAL_SERVER_ERROR, b"error\n")

    def _answer(
        self,
        connection: _Connection,
        code: HTTPStatus,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        head_only: bool = False,
    ) -> None:
        head = (
            f"HTTP/1.1 {code.value} {code.phrase}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        connection.outbox = memoryview(head if head_only else head + body)
        connection.answered = True
        connection.inbox.clear()
        self._write(connection)

    def _write(self, connection: _Connection) -> None:
        sent = connection.sock.send(connection.outbox)
        connection.outbox = connection.outbox[sent:]
        if connection.outbox:
            self._selector.modify(
                connection.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, connection
            )
            return
        # All sent: half-close, then wait (within the deadline) for the client's close,
        # so that the answer is not cut by a reset from unread bytes.
        connection.sock.shutdown(socket.SHUT_WR)
        self._selector.modify(connection.sock, selectors.EVENT_READ, connection)

    def _close(self, connection: _Connection) -> None:
        if connection.closed:
            return
        connection.closed = True
        self._open -= 1
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        connection.sock.close()


def serve(
    metrics: AgentMetrics,
    port: int,
    ready: Callable[[], bool],
    host: str = "0.0.0.0",
    *,
    max_connections: int = MAX_CONNECTIONS,
    request_seconds: float = REQUEST_SECONDS,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> MetricsServer:
    """Serve /metrics, /healthz and /readyz on `host:port` (port 0: any free port, see
    `.port`) until `shutdown()`; see MetricsServer for the limits."""
    server = MetricsServer(
        metrics,
        ready,
        host,
        port,
        max_connections=max_connections,
        request_seconds=request_seconds,
        max_request_bytes=max_request_bytes,
    )
    log.info("metrics on http://%s:%d/metrics", host, server.port)
    return server
