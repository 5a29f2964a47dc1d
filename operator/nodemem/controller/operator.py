"""The controller: kopf watches policies, nodes and reports; one loop rolls them up.

Its state is kept from `on.event` streams (they write nothing to the objects and start
in seconds at 5,000 objects), never from `@kopf.index`, whose cold start is far slower
(measured: docs/testing.md#the-control-plane). Policy status is recomputed when something
changed, at most every `interval` seconds, and patched only when it differs. Reports
of nodes that no longer exist are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client as k8s

from nodemem.api.status import NodeMemoryPolicyStatus
from nodemem.controller.rollup import ReportDigest, digest_report, rollup

log = logging.getLogger("nodemem.controller")

GROUP, VERSION = "nodemem.dev", "v1alpha1"
POLICIES, REPORTS = "nodememorypolicies", "nodememoryreports"


@dataclass
class ClusterState:
    """What the controller knows, fed by watch events. Touched from kopf's loop only."""

    policies: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    nodes: dict[str, Mapping[str, str]] = field(default_factory=dict)
    reports: dict[str, ReportDigest | None] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.monotonic)
    deleted_nodes: set[str] = field(default_factory=set)


@dataclass
class ControllerSettings:
    interval: float = 1.0  # the shortest time between two roll-ups
    # Reports with no Node are collected only after this long: at start the node and
    # report streams fill in no particular order.
    orphan_grace: float = 30.0


class Controller:
    def __init__(
        self,
        api_client: k8s.ApiClient,
        settings: ControllerSettings | None = None,
    ) -> None:
        self.api = k8s.CustomObjectsApi(api_client)
        self.settings = settings or ControllerSettings()
        self.state: ClusterState | None = None
        self.status_writes = 0
        self.reports_deleted = 0
        self.rounds = 0  # roll-up rounds completed (tests wait for one)

    # -- registry -------------------------------------------------------------------

    def registry(self, login: Callable[..., Any]) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        kopf.on.login(registry=registry)(login)
        kopf.on.startup(registry=registry)(self._startup)
        kopf.on.cleanup(registry=registry)(self._cleanup)
        kopf.on.event(GROUP, VERSION, POLICIES, registry=registry)(self._on_policy)
        kopf.on.event("", "v1", "nodes", registry=registry)(self._on_node)
        kopf.on.event(GROUP, VERSION, REPORTS, registry=registry)(self._on_report)
        kopf.on.probe(id="rollups", registry=registry)(lambda **_: self.status_writes)
        return registry

    async def _startup(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # no k8s events about our own handlers
        settings.scanning.disabled = True  # cluster-scoped kinds only: no namespace scanning
        # Memory at 5,000 nodes (bench/controller_scale.py): list in pages, and let the
        # per-object workers (each holding its last event) go soon after they are idle.
        settings.watching.chunk_size = 500
        settings.queueing.idle_timeout = 0.5
        settings.watching.server_timeout = 300
        # kopf's default gives up on a request after 8 retries (~54 s); an API server
        # upgrade or outage can last longer, and a controller that exits over it only
        # comes back after its pod's restart back-off.
        settings.networking.error_backoffs = RetryForever()
        self.state = ClusterState()
        self._loop_task = asyncio.create_task(self._rollup_loop(self.state))

    async def _cleanup(self, **_: Any) -> None:
        task = getattr(self, "_loop_task", None)
        if task is not None:
            task.cancel()

    def _state(self) -> ClusterState:
        if self.state is None:  # events may not arrive before startup: kopf orders them
            raise RuntimeError("controller state used before startup")
        return self.state

    async def _on_policy(self, type: str | None, body: kopf.Body, name: str, **_: Any) -> None:
        state = self._state()
        if type == "DELETED":
            state.policies.pop(name, None)
        else:
            state.policies[name] = dict(body)
        state.changed.set()

    async def _on_node(self, type: str | None, name: str, labels: kopf.Labels, **_: Any) -> None:
        state = self._state()
        if type == "DELETED":
            state.nodes.pop(name, None)
            state.deleted_nodes.add(name)
        else:
            state.nodes[name] = dict(labels)
            state.deleted_nodes.discard(name)
        state.changed.set()

    async def _on_report(self, type: str | None, body: kopf.Body, name: str, **_: Any) -> None:
        state = self._state()
        if type == "DELETED":
            state.reports.pop(name, None)
        else:
            state.reports[name] = digest_report(body.get("status"))
        state.changed.set()

    # -- the roll-up loop -----------------------------------------------------------

    async def _rollup_loop(self, state: ClusterState) -> None:
        while True:
            await self._wait_for_change(state)
            state.changed.clear()
            try:
                await self.reconcile(state)
            except Exception:  # one bad round must not stop the controller
                log.exception("roll-up failed; retrying")
                state.changed.set()
            await asyncio.sleep(self.settings.interval)

    async def _wait_for_change(self, state: ClusterState) -> None:
        """Until something changed, or until the orphan grace ends while a report without
        a known Node waits for it (a quiet cluster sends no event that would wake us)."""
        remaining = self.settings.orphan_grace - (time.monotonic() - state.started)
        waiting = remaining > 0 and any(report not in state.nodes for report in state.reports)
        if not waiting:
            await state.changed.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.changed.wait(), timeout=remaining)

    async def reconcile(self, state: ClusterState) -> None:
        try:
            await self._reconcile(state)
        finally:
            self.rounds += 1

    async def _reconcile(self, state: ClusterState) -> None:
        await self._collect_orphans(state)
        for name, body in list(state.policies.items()):
            previous = _status_of(body)
            status = rollup(body, state.nodes, state.reports, previous)
            if previous is not None and status == previous:
                continue
            # A merge patch keeps what it does not name: the nulls are sent so that a field
            # that became empty is removed, not left stale (the server stores no nulls).
            patch = {"status": status.model_dump(by_alias=True)}
            try:
                await asyncio.to_thread(
                    self.api.patch_cluster_custom_object_status,
                    GROUP,
                    VERSION,
                    POLICIES,
                    name,
                    patch,
                )
            except k8s.ApiException as exc:
                if exc.status == 404:
                    continue  # deleted meanwhile
                raise
            self.status_writes += 1
            # Our own write comes back as an event; until then assume it landed.
            state.policies[name] = {
                **body,
                "status": status.model_dump(by_alias=True, exclude_none=True),
            }

    async def _collect_orphans(self, state: ClusterState) -> None:
        settled = time.monotonic() - state.started > self.settings.orphan_grace
        for report in list(state.reports):
            if report in state.nodes:
                continue
            if report not in state.deleted_nodes and not settled:
                continue
            try:
                await asyncio.to_thread(
                    self.api.delete_cluster_custom_object, GROUP, VERSION, REPORTS, report
                )
            except k8s.ApiException as exc:
                if exc.status != 404:
                    raise
            state.reports.pop(report, None)
            state.deleted_nodes.discard(report)
            self.reports_deleted += 1
            log.info("deleted the report of node %s, which no longer exists", report)


class RetryForever:
    """kopf's API retry delays: its defaults, then every 30 s for as long as it takes. An
    iterable, not an iterator: kopf starts it afresh for every request."""

    def __iter__(self) -> Iterator[float]:
        yield from (1, 1, 2, 3, 5, 8, 13, 21)
        yield from itertools.repeat(30.0)


def _status_of(body: Mapping[str, Any]) -> NodeMemoryPolicyStatus | None:
    raw = body.get("status")
    if not raw:
        return None
    try:
        return NodeMemoryPolicyStatus.model_validate(raw)
    except ValueError:
        return None


def run_in_thread(
    controller: Controller,
    login: Callable[..., Any],
    *,
    liveness_endpoint: str | None = None,
    peering_name: str | None = None,
) -> tuple[threading.Thread, threading.Event, Callable[[], None]]:
    """Start the operator in its own thread and loop; returns (thread, ready, stop)."""
    ready = threading.Event()
    stop = threading.Event()

    def main() -> None:
        kopf.run(
            registry=controller.registry(login),
            clusterwide=True,
            standalone=peering_name is None,
            peering_name=peering_name,
            liveness_endpoint=liveness_endpoint,
            ready_flag=ready,
            stop_flag=stop,
        )

    thread = threading.Thread(target=main, name="nodemem-controller", daemon=True)
    thread.start()
    return thread, ready, stop.set
