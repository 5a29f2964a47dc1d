"""The node agent's reconcile loop, one thread: policy in, enforcement, exec events.

Woken by: a policy change, an exec event from the proc connector (oom rules for the
new process), a cleanup deadline, and the resync timer. Without the proc connector
the resync timer rescans every process instead (the polling fallback).
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from nodemem.agent.nri_rules import nri_rules, write_nri_rules
from nodemem.api.policy import NodeMemoryPolicy
from nodemem.api.report import CleanupStatus
from nodemem.host.cleanup import CleanupResult
from nodemem.host.identity import read_pod_cgroup
from nodemem.host.meminfo import read_meminfo
from nodemem.host.oom_adj import has_cap_sys_resource
from nodemem.host.originals import Originals
from nodemem.host.paths import HostPaths
from nodemem.host.pod_shm import host_mount_namespace, mount_namespace
from nodemem.host.proc_connector import (
    EventType,
    LostEvents,
    ProcConnector,
    ProcConnectorUnavailable,
)
from nodemem.host.procfs import ProcessGone, ProcessUnreadable, list_pids, start_time
from nodemem.host.shmem import scan_node
from nodemem.host.tmpfs_limits import LimitState
from nodemem.policy.apply import (
    ApplyResult,
    CleanupOutcome,
    TmpfsOutcome,
    apply_cleanups,
    apply_tmpfs,
)
from nodemem.policy.effective import EffectivePolicy, EffectiveTmpfs, effective_policy
from nodemem.policy.oom import OomOutcome, OomResult, apply_to_process
from nodemem.policy.pod_shm import PodShmTargets, selects_pod
from nodemem.policy.pods import PodDirectory
from nodemem.policy.report import cleanup_status
from nodemem.policy.schedule import CleanupClock
from nodemem.policy.undo import held_superblocks, restore_adj, restore_tmpfs

log = logging.getLogger("nodemem.agent")

# A policy source returns the current policies, or None when they have not changed.
PolicySource = Callable[[], Sequence[NodeMemoryPolicy] | None]


@dataclass
class AgentSettings:
    resync_seconds: float = 30.0
    poll_seconds: float = 1.0  # how often the policy source is asked for changes
    dry_run: bool = False
    use_proc_connector: bool = True
    # While exec events flow, a resync re-reads only processes it has not seen; every
    # this many resyncs it re-reads all (a cgroup move or a prctl rename has no event).
    full_oom_rescan_every: int = 10
    # Where the NRI plugin's rules are written at every policy change (agent/nri_rules.py).
    nri_rules_file: Path | None = None


# Outcomes worth remembering for a process: trying again gives the same answer until the
# process execs (an event) or the policy or the pods change (the cache is dropped).
_SETTLED = frozenset({"Adjusted", "Unchanged", "Planned", "Forbidden"})


@dataclass
class AgentState:
    """What the loop knows and last did; read by tests and the report writer."""

    effective: EffectivePolicy | None = None
    last_apply: ApplyResult | None = None
    exec_oom: OomResult = field(default_factory=OomResult)
    cleanups: dict[str, CleanupStatus] = field(default_factory=dict)  # last run per rule
    connector_active: bool = False
    resyncs: int = 0


class NodeAgent:
    def __init__(
        self,
        paths: HostPaths,
        policies: PolicySource,
        *,
        node_labels: dict[str, str] | None = None,
        pods: PodDirectory | None = None,
        settings: AgentSettings | None = None,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_cycle: Callable[[NodeAgent], None] | None = None,
        originals: Originals | None = None,
        restore_allowed: Callable[[], bool] = lambda: True,
    ) -> None:
        self.paths = paths
        # What the policies changed, as it was: written back when no item holds a target
        # any more, at resync, if `restore_allowed` (the cluster agent: once the API told
        # the policies, the node and the pods; saved ones in an outage never undo).
        self.originals = originals if originals is not None else Originals(None, paths)
        self.restore_allowed = restore_allowed
        # The last full oom pass: each process seen (pid -> start time), and which of them
        # a rule matched; a recorded process outside `matched` is restored.
        self._oom_seen: dict[int, int] = {}
        self._oom_matched: set[int] = set()
        self.policies = policies
        self.node_labels = node_labels or {}
        self._labels_changed = False
        self._last_policies: Sequence[NodeMemoryPolicy] = ()
        self.on_cycle = on_cycle  # after every resync and cleanup run: the report writer
        # (pid, start time) -> the oom outcome last applied (None: no rule matches).
        self._settled: dict[int, tuple[int, OomOutcome | None]] = {}
        self._settled_for = -1  # the inputs version the settled outcomes were computed for
        self._pods = pods or PodDirectory()
        # podShm items at exec: (pod UID, superblock dev) sized or passed over, and (pod
        # UID, mount namespace inode) looked at, since the last resync (which refills them).
        self._shm_done: set[tuple[str, int]] = set()
        self._shm_namespaces: set[tuple[str, int]] = set()
        self._inputs_version = 0  # bumped when the policy or the pods change
        self.settings = settings or AgentSettings()
        self.state = AgentState()
        self.clock = CleanupClock()
        self.stopping = threading.Event()
        self.wall_clock = wall_clock  # cron deadlines; tests move it
        self.memory_total = read_meminfo(paths)["MemTotal"]

    def stop(self) -> None:
        self.stopping.set()

    @property
    def pods(self) -> PodDirectory:
        return self._pods

    @pods.setter
    def pods(self, pods: PodDirectory) -> None:
        """The pods on this node changed (from another thread): pod criteria re-match."""
        self._pods = pods
        self._inputs_version += 1

    def set_node_labels(self, labels: dict[str, str]) -> None:
        """The node's labels changed (from another thread): re-select policies."""
        if labels != self.node_labels:
            self.node_labels = labels
            self._labels_changed = True

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        connector = self._open_connector()
        try:
            self._loop(connector)
        finally:
            if connector is not None:
                connector.close()  # sends IGNORE: the kernel's listener count stays right
            self.state.connector_active = False

    def _open_connector(self) -> ProcConnector | None:
        if not self.settings.use_proc_connector:
            return None
        try:
            connector = ProcConnector()
            connector.subscribe()
        except ProcConnectorUnavailable as exc:
            log.warning("proc connector unavailable (%s): oom rules rescan every resync", exc)
            return None
        self.state.connector_active = True
        return connector

    def _loop(self, connector: ProcConnector | None) -> None:
        next_resync = 0.0  # resync at once
        next_poll = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + self.settings.poll_seconds
                changed = self._refresh_policy()
                if changed:
                    next_resync = now  # a new policy is applied at once
            if now >= next_resync:
                next_resync = now + self.settings.resync_seconds
                self.resync()
            self._run_due_cleanups()
            timeout = max(0.0, min(next_poll, next_resync) - time.monotonic())
            deadline = self.clock.next_deadline()
            if deadline is not None:
                until = (deadline - self.wall_clock()).total_seconds()
                timeout = max(0.0, min(timeout, until))
            self._wait(connector, timeout)

    def _wait(self, connector: ProcConnector | None, timeout: float) -> None:
        if connector is None:
            self.stopping.wait(timeout)
            return
        # Wake at least every 0.2 s so that stop() is noticed promptly.
        ready, _, _ = select.select([connector.fileno()], [], [], min(timeout, 0.2))
        if ready:
            self._handle_events(connector)

    def _handle_events(self, connector: ProcConnector) -> None:
        effective = self.state.effective
        for event in connector.read_events():
            if isinstance(event, LostEvents):
                log.warning("proc connector lost events: rescanning every process")
                self._apply_oom_everywhere(full=True)
                continue
            if event.what is EventType.EXEC:
                self._settled.pop(event.tgid, None)  # a new program: a new identity
            if event.what is EventType.EXEC and effective is not None and effective.oom:
                outcome = apply_to_process(
                    self.paths,
                    event.tgid,
                    effective.oom,
                    self.pods,
                    dry_run=self.settings.dry_run,
                    originals=self._recording(),
                )
                if outcome is not None:
                    self.state.exec_oom.record(outcome)
            if event.what is EventType.EXEC and effective is not None:
                pod_shm = [item for item in effective.tmpfs if item.item.pod_shm]
                if pod_shm:
                    self._size_pod_shm(event.tgid, pod_shm)

    # -- steps ------------------------------------------------------------------------

    def _refresh_policy(self) -> bool:
        policies = self.policies()
        if policies is None:
            if not self._labels_changed:
                return False
            policies = self._last_policies
        self._labels_changed = False
        self._last_policies = policies
        effective = effective_policy(policies, self.node_labels, self.memory_total)
        self.state.effective = effective
        self._inputs_version += 1
        if self.settings.nri_rules_file is not None:
            rules = [] if self.settings.dry_run else effective.oom
            allowed = has_cap_sys_resource(self.paths)
            write_nri_rules(
                self.settings.nri_rules_file, nri_rules(rules, negative_allowed=allowed)
            )
        self.clock.track(
            {item.name: item.item.schedule for item in effective.cleanup}, self.wall_clock()
        )
        names = ", ".join(f"{p.name}/{p.generation}" for p in effective.policies) or "none"
        log.info("policies in force: %s", names)
        return True

    def resync(self) -> None:
        """Enforce everything once: tmpfs limits, then oom rules on every process."""
        effective = self.state.effective
        if effective is None:
            return
        result = ApplyResult()
        pod_shm = PodShmTargets(self.paths, self.pods)
        result.tmpfs = apply_tmpfs(
            self.paths,
            effective.tmpfs,
            dry_run=self.settings.dry_run,
            pods=self.pods,
            originals=self._recording(),
            pod_shm=pod_shm,
        )
        self._shm_done.clear()
        self._shm_namespaces.clear()
        self._note_pod_shm(pod_shm, result.tmpfs)
        full = self.state.resyncs % max(1, self.settings.full_oom_rescan_every) == 0
        result.oom = self._apply_oom_everywhere(full=full)
        if (
            self._recording() is not None
            and self.originals
            and not self._labels_changed  # re-selected at the next poll: undo then
            and self.restore_allowed()
        ):
            self._restore_released(result)
        self.state.last_apply = result
        self.state.resyncs += 1
        for outcome in result.tmpfs:
            log.info(
                "tmpfs %s: %s %s", outcome.result.path, outcome.result.state, outcome.result.message
            )
        log.info("oom rules: %d matched, states %s", result.oom.matched, dict(result.oom.states))
        self._cycle_done()

    def _size_pod_shm(self, pid: int, items: Sequence[EffectiveTmpfs]) -> None:
        """A new process of a pod that a podShm item selects: size the pod's /dev/shm,
        once per superblock (the other containers of the pod show the same one).

        Cheap for every other exec: one cgroup read, and for a pod's process one stat of
        its mount namespace; a namespace already looked at is not read again. A pod the
        directory does not know yet (the API told it late) waits for its next exec or
        the resync.
        """
        try:
            uid = read_pod_cgroup(self.paths, pid).pod_uid
            pod = self.pods.get(uid)
            if uid is None or pod is None:
                return
            namespace = mount_namespace(self.paths, pid)
        except (ProcessGone, ProcessUnreadable, OSError):
            return
        host = host_mount_namespace(self.paths)
        # The host's namespace: a runtime's helper (runc init, conmon), not a container yet.
        if namespace == host or (uid, namespace) in self._shm_namespaces:
            return
        if not any(item.item.pods and selects_pod(item.item.pods, pod) for item in items):
            return
        shm = PodShmTargets(self.paths, self.pods, pids=[pid], done=self._shm_done)
        outcomes = apply_tmpfs(
            self.paths,
            items,
            dry_run=self.settings.dry_run,
            pods=self.pods,
            originals=self._recording(),
            pod_shm=shm,
        )
        self._note_pod_shm(shm, outcomes)
        rows = [outcome for outcome in outcomes if outcome.pod is not None]
        for outcome in rows:
            log.info(
                "tmpfs %s of pod %s (new process %d): %s %s",
                outcome.result.path,
                outcome.pod,
                pid,
                outcome.result.state,
                outcome.result.message,
            )
        if rows and self.state.last_apply is not None:
            self.state.last_apply.tmpfs = _merge_pod_rows(self.state.last_apply.tmpfs, rows)
            self._cycle_done()

    def _note_pod_shm(self, shm: PodShmTargets, outcomes: Sequence[TmpfsOutcome]) -> None:
        """Remember the pods' /dev/shm an apply handled, so that exec events skip them.

        Not one the apply found gone (NotFound at a target): the process it was reached
        through exited meanwhile (often the runtime's short-lived `mount` helper), or the
        mount changed; the next exec in that namespace looks again.
        """
        gone = {
            (outcome.target.namespace_pid, outcome.target.mount_point)
            for outcome in outcomes
            if outcome.target is not None and outcome.result.state is LimitState.NOT_FOUND
        }
        for entry in shm.looked_at:
            if not entry.settled or entry.dev is None:
                continue  # looked at again at the next exec in that namespace
            if (entry.target.namespace_pid, entry.target.mount_point) in gone:
                continue
            key = (entry.pod_uid, entry.dev)
            if entry in shm.selected_any or key in self._shm_done:
                self._shm_done.add(key)
                self._shm_namespaces.add((entry.pod_uid, entry.namespace))

    def _recording(self) -> Originals | None:
        return None if self.settings.dry_run else self.originals

    def _restore_released(self, result: ApplyResult) -> None:
        """Write back the originals of what no item holds now (a record's target that
        another item holds is handed over: its first original stays recorded)."""
        held = held_superblocks(outcome.target for outcome in result.tmpfs)
        result.tmpfs += restore_tmpfs(self.paths, self.originals, keep=lambda k: k.dev in held)
        restore_adj(
            self.paths,
            self.originals,
            result.oom,
            keep=lambda o: self._oom_seen.get(o.pid) == o.start and o.pid in self._oom_matched,
        )

    def _cycle_done(self) -> None:
        if self.on_cycle is not None:
            try:
                self.on_cycle(self)
            except Exception:  # reporting must never stop enforcement
                log.exception("reporting failed")

    def _apply_oom_everywhere(self, *, full: bool) -> OomResult:
        """Apply the oom rules to every process; re-read only new ones when exec events
        keep the others current (see AgentSettings.full_oom_rescan_every)."""
        effective = self.state.effective
        self._oom_seen, self._oom_matched = {}, set()
        if effective is None or not effective.oom:
            return OomResult()
        version = self._inputs_version
        if full or not self.state.connector_active or version != self._settled_for:
            self._settled.clear()
            self._settled_for = version
        result = OomResult()
        seen: set[int] = set()
        for pid in list_pids(self.paths):
            try:
                started = start_time(self.paths, pid)
            except (ProcessGone, ProcessUnreadable):
                continue
            seen.add(pid)
            self._oom_seen[pid] = started
            cached = self._settled.get(pid)
            if cached is not None and cached[0] == started:
                outcome = cached[1]
                if outcome is not None:
                    self._oom_matched.add(pid)
                    result.record(_as_settled(outcome))
                continue
            try:
                outcome = apply_to_process(
                    self.paths,
                    pid,
                    effective.oom,
                    self.pods,
                    dry_run=self.settings.dry_run,
                    started=started,
                    originals=self._recording(),
                )
            except ProcessUnreadable:
                result.unreadable += 1
                self._oom_matched.add(pid)  # unknown: not restored on a guess
                continue
            if outcome is None or outcome.state in _SETTLED:
                self._settled[pid] = (started, outcome)
            if outcome is not None:
                self._oom_matched.add(pid)
                result.record(outcome)
        for pid in self._settled.keys() - seen:
            del self._settled[pid]
        return result

    def _run_due_cleanups(self) -> None:
        effective = self.state.effective
        if effective is None:
            return
        now = self.wall_clock()
        due = set(self.clock.due_now(now))
        if not due:
            return
        items = [item for item in effective.cleanup if item.name in due]
        try:
            held_open = scan_node(self.paths).open_tmpfs_files
        except Exception as exc:  # without it held files would be removed: run none this time
            log.exception("cleanup: scanning for open files failed")
            outcomes = [
                CleanupOutcome(
                    item.policy,
                    CleanupResult.failed(
                        item.name,
                        dry_run=self.settings.dry_run or item.dry_run,
                        message=f"scanning for open files failed: {exc}",
                    ),
                )
                for item in items
            ]
        else:  # each rule's own failure is its state (apply_cleanups), never the loop's end
            outcomes = apply_cleanups(self.paths, items, held_open, dry_run=self.settings.dry_run)
        for outcome in outcomes:
            self.clock.ran(outcome.result.name, now)
            status = cleanup_status(outcome)
            status.last_run = now.strftime("%Y-%m-%dT%H:%M:%SZ")
            status.next_run = self.clock.due[outcome.result.name].strftime("%Y-%m-%dT%H:%M:%SZ")
            self.state.cleanups[outcome.result.name] = status
            log.info(
                "cleanup %s: %d files, %d bytes %s, %d held open, %d errors",
                outcome.result.name,
                outcome.result.files_removed,
                outcome.result.bytes_removed,
                "would be removed (dry run)" if outcome.result.dry_run else "removed",
                len(outcome.result.held_open),
                len(outcome.result.errors),
            )
            if status.state != "Completed":
                problems = [status.message] if status.message else []
                problems += [f"{p.pattern}: {p.message}" for p in status.patterns if p.message]
                log.warning(
                    "cleanup rule %s %s: %s", status.name, status.state, "; ".join(problems)
                )
        if self.state.last_apply is not None:
            self.state.last_apply.cleanup = outcomes
        self._cycle_done()


def _merge_pod_rows(rows: list[TmpfsOutcome], new: list[TmpfsOutcome]) -> list[TmpfsOutcome]:
    """The last resync's tmpfs rows with a pod's rows from an exec event: they replace
    that pod's rows, and the "no selected pod" row of their item's policy."""
    replaced = {(o.policy, o.pattern, o.pod) for o in new}
    emptied = {(o.policy, o.pattern, None) for o in new}
    kept = [
        o
        for o in rows
        if (o.policy, o.pattern, o.pod) not in replaced
        and not ((o.policy, o.pattern, o.pod) in emptied and o.target is None)
    ]
    return kept + new


def _as_settled(outcome: OomOutcome) -> OomOutcome:
    """What applying the same rule again would report: a value written earlier is now
    simply in place."""
    if outcome.state != "Adjusted":
        return outcome
    return replace(
        outcome,
        state="Unchanged",
        previous=outcome.requested,
        message=f"already {outcome.requested}",
    )
