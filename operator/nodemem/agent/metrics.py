"""Prometheus metrics and the health endpoints of the agent, on one port.

Series (all gauges reflect the last cycle; counters accumulate since start):
  nodemem_shmem_bytes{kind}                 Shmem attributed by kind
  nodemem_shmem_unaccounted_bytes           Shmem in no known object
  nodemem_tmpfs_size_bytes{path}            tmpfs limit in force
  nodemem_tmpfs_used_bytes{path}            tmpfs use
  nodemem_cleanup_freed_bytes_total{rule}   bytes removed by cleanups
  nodemem_cleanup_held_open_files{rule}     files kept because a process holds them
  nodemem_oom_adjustments_total{rule}       oom_score_adj writes
  nodemem_oom_failures_total{rule}          Forbidden or Failed writes
  nodemem_scan_duration_seconds             last attribution pass
  nodemem_api_errors_total{operation}       failed Kubernetes API calls
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nodemem.api.report import ApplyReport, HostReport


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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

    def observe_apply(self, report: ApplyReport) -> None:
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


def serve(
    metrics: AgentMetrics, port: int, ready: Callable[[], bool], host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz (the process answers) and /readyz (`ready()`)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                self._answer(200, b"ok\n")
            elif self.path == "/readyz":
                ok = ready()
                self._answer(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._answer(404, b"not found\n")

        def _answer(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would flood the log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
