"""OOM rules: which processes match, and setting their oom_score_adj.

Rules come ordered (higher-priority policies first, then as written); the first rule
that matches a process decides its value. PID 1, kernel threads and the agent itself
are never touched (host.oom_adj refuses them; they are not even counted here).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nodemem.api.policy import OomMatch
from nodemem.host.identity import ProcessIdentity, read_identity
from nodemem.host.oom_adj import AdjState, read_oom_score_adj, set_oom_score_adj
from nodemem.host.originals import AdjOriginal, Originals
from nodemem.host.paths import HostPaths
from nodemem.host.procfs import ProcessGone, ProcessUnreadable, list_pids, start_time
from nodemem.policy.effective import EffectiveOomRule
from nodemem.policy.pods import PodDirectory, PodInfo

PLANNED = "Planned"  # dry run: this value would be written
# Undo (policy.undo): a rule stopped applying and the original value was written back, or
# the kernel refused it (kept, retried).
RESTORED = "Restored"
RESTORE_REFUSED = "RestoreRefused"
MAX_OUTCOMES_KEPT = 200


def rule_matches(match: OomMatch, process: ProcessIdentity, pod: PodInfo | None) -> bool:
    """Every criterion given must hold. Regexes search (anchor with ^ and $)."""
    if match.comm is not None and not match.comm.search(process.comm):
        return False
    if match.cmdline is not None and not match.cmdline.search(process.cmdline):
        return False
    if match.cgroup is not None and not match.cgroup.search(process.cgroup):
        return False
    if match.qos_class is not None and process.qos_class != match.qos_class:
        return False
    needs_pod = match.namespace or match.label_selector is not None or match.container
    if not needs_pod:
        return True
    if pod is None:
        return False  # a pod criterion never matches a process outside known pods
    if is_sandbox(process, pod):
        return False
    if match.namespace is not None and pod.namespace != match.namespace:
        return False
    if match.label_selector is not None and not match.label_selector.matches(pod.labels):
        return False
    return match.container is None or (
        process.container_id is not None
        and pod.containers.get(process.container_id) == match.container
    )


# The runtimes' pod sandbox process (registry.k8s.io/pause, CRI-O's pause): the kubelet
# gives it -998 so that the OOM killer never takes it, which would end every container
# of the pod. It is in the pod's cgroup, but no container status names its ID.
SANDBOX_COMM = "pause"


def is_sandbox(process: ProcessIdentity, pod: PodInfo) -> bool:
    """A pod's sandbox process: named `pause`, in a container the pod's status does not
    list. (A new container is not listed for a second or two either: the name tells it
    apart, and a process that names itself so is matched once its container is listed.)"""
    return process.comm == SANDBOX_COMM and process.container_id not in pod.containers


def first_match(
    rules: Sequence[EffectiveOomRule], process: ProcessIdentity, pods: PodDirectory
) -> EffectiveOomRule | None:
    pod = pods.get(process.pod_uid)
    return next((rule for rule in rules if rule_matches(rule.item.match, process, pod)), None)


@dataclass(frozen=True)
class OomOutcome:
    pid: int
    comm: str
    rule: str
    policy: str
    state: str  # an AdjState value, or PLANNED
    previous: int | None
    requested: int
    message: str


@dataclass
class OomResult:
    matched: int = 0
    states: Counter[str] = field(default_factory=Counter)
    per_rule: dict[str, Counter[str]] = field(default_factory=dict)
    outcomes: list[OomOutcome] = field(default_factory=list)
    unreadable: int = 0

    def record(self, outcome: OomOutcome) -> None:
        self.matched += 1
        self.states[outcome.state] += 1
        self.per_rule.setdefault(outcome.rule, Counter())[outcome.state] += 1
        if len(self.outcomes) < MAX_OUTCOMES_KEPT or outcome.state in LISTED_ADJ_STATES:
            self.outcomes.append(outcome)

    def record_restore(self, outcome: OomOutcome) -> None:
        """A value put back: counted by state, but no rule matched the process."""
        self.states[outcome.state] += 1
        self.outcomes.append(outcome)

    @property
    def failed(self) -> bool:
        return any(self.states[state] for state in FAILED_ADJ_STATES)


FAILED_ADJ_STATES = frozenset({AdjState.FORBIDDEN.value, AdjState.FAILED.value, RESTORE_REFUSED})
# Listed per process in reports: the failures, and matched processes not written because
# they were gone by the write (not failures: nothing to fix).
LISTED_ADJ_STATES = FAILED_ADJ_STATES | {AdjState.VANISHED.value}


def apply_to_process(
    paths: HostPaths,
    pid: int,
    rules: Sequence[EffectiveOomRule],
    pods: PodDirectory,
    *,
    dry_run: bool,
    started: int | None = None,
    originals: Originals | None = None,
) -> OomOutcome | None:
    """Apply the first matching rule to one process; None when none applies or it is gone.

    `started` is the process's start time if the caller read it before calling (read
    here otherwise): the value is written only to the process that started then. Its
    value before the first change is put in `originals`.
    Raises ProcessUnreadable when the process's identity cannot be read.
    """
    if pid in (1, os.getpid()):
        return None
    try:
        # Before the identity: a pid reused after this point fails the write's check.
        if started is None:
            started = start_time(paths, pid)
        process = read_identity(paths, pid)
    except ProcessGone:
        return None
    if process.kthread:
        return None
    rule = first_match(rules, process, pods)
    if rule is None:
        return None
    wanted = rule.item.oom_score_adj
    if dry_run or rule.dry_run:
        try:
            current = read_oom_score_adj(paths, pid)
        except ProcessGone:
            return None
        state = AdjState.UNCHANGED.value if current == wanted else PLANNED
        message = f"already {wanted}" if current == wanted else f"would set {current} -> {wanted}"
        return OomOutcome(
            pid, process.comm, rule.name, rule.policy, state, current, wanted, message
        )
    if originals is not None and (pid, started) not in originals.adj:
        try:
            before: int | None = read_oom_score_adj(paths, pid)
        except ProcessGone:
            return None
        except ValueError:  # the write below fails the same way, and says so
            before = None
        # A pid reused since `started` fails the write's check below: never restored.
        if before is not None and before != wanted:
            originals.add_adj(
                AdjOriginal(pid, started, before, process.comm, rule.policy, rule.name)
            )
    result = set_oom_score_adj(paths, pid, wanted, expected_start=started)
    return OomOutcome(
        pid,
        process.comm,
        rule.name,
        rule.policy,
        result.state.value,
        result.previous,
        wanted,
        result.message,
    )


def apply_oom_rules(
    paths: HostPaths,
    rules: Sequence[EffectiveOomRule],
    pods: PodDirectory,
    *,
    dry_run: bool,
    pids: Iterable[int] | None = None,
    originals: Originals | None = None,
) -> OomResult:
    """Apply the rules to `pids` (default: every process)."""
    result = OomResult()
    if not rules:
        return result
    for pid in list_pids(paths) if pids is None else pids:
        try:
            outcome = apply_to_process(
                paths, pid, rules, pods, dry_run=dry_run, originals=originals
            )
        except ProcessUnreadable:
            result.unreadable += 1
            continue
        if outcome is not None:
            result.record(outcome)
    return result
