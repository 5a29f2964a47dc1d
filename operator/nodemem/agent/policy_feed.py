"""Policies in: every NodeMemoryPolicy of the cluster, by the list-watch loop.

Read only: nothing is ever written to a policy (no annotations, no finalizers, no
status), so any number of agents can follow them. The loop LISTs again every
`relist_seconds` (5 minutes in the agent): a policy deleted before a watch began, or
while the agent was away, is in no watch event, and only a LIST shows it is gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from nodemem.agent.kubeapi import POLICIES_PATH, RawApi
from nodemem.agent.listwatch import ListWatch
from nodemem.agent.metrics import AgentMetrics
from nodemem.agent.state_dir import StateDir
from nodemem.api.manifest import PolicyError, validate_policy
from nodemem.api.policy import NodeMemoryPolicy

log = logging.getLogger("nodemem.agent")


class ClusterPolicies:
    """A PolicySource fed by watch events and LISTs; the policies in force are saved on
    the host.

    Until the API answers, the saved policies are in force (an outage or a restart
    must not lift the limits). Invalid policies are skipped: the controller reports them.
    `confirmed` is set by the first authoritative LIST (`replace_all`): before it the set
    in force may be stale or partial (saved, or some watch events only), and nothing is
    undone on its account.
    """

    def __init__(self, state_dir: StateDir | None) -> None:
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self._objects: dict[str, NodeMemoryPolicy] = {}
        saved = state_dir.load_policies() if state_dir else None
        self._changed = True  # the first call answers: saved policies, or none yet
        self.confirmed = threading.Event()
        # Watch events are numbered, so that a LIST answered before an event cannot undo
        # it (see replace_all): name -> number of the last event about it.
        self._events = 0
        self._touched: dict[str, int] = {}
        if saved:
            self._objects = {p.name: p for p in saved}
            log.info("loaded saved policies: %s", ", ".join(self._objects) or "none")

    def on_event(self, type_: str, obj: Mapping[str, Any]) -> None:
        """A watch event (ADDED, MODIFIED, DELETED) about one policy."""
        name = str((obj.get("metadata") or {}).get("name", ""))
        with self._lock:
            self._events += 1
            self._touched[name] = self._events
            if type_ == "DELETED":
                changed = self._objects.pop(name, None) is not None
            else:
                try:
                    policy = validate_policy(dict(obj))
                except PolicyError as exc:
                    log.warning("policy %s is invalid, not applied: %s", name, exc)
                    changed = self._objects.pop(name, None) is not None
                else:
                    changed = self._objects.get(name) != policy
                    self._objects[name] = policy
            self._changed |= changed

    def events_seen(self) -> int:
        """Call before a LIST; pass the number to replace_all with its answer."""
        with self._lock:
            return self._events

    def replace_all(self, objects: Sequence[dict[str, Any]], since: int | None = None) -> None:
        """The authoritative set from a LIST: drops policies deleted meanwhile (saved ones
        deleted during an outage, or one deleted before the watch began, of which the
        watch never tells). A policy a watch event touched after `since` (events_seen()
        when the LIST was sent) keeps what that newer event said."""
        policies: dict[str, NodeMemoryPolicy] = {}
        for obj in objects:
            try:
                policy = validate_policy(obj)
            except PolicyError:
                continue
            policies[policy.name] = policy
        with self._lock:
            if since is not None:
                for name, number in self._touched.items():
                    if number <= since:
                        continue
                    policies.pop(name, None)
                    if name in self._objects:
                        policies[name] = self._objects[name]
            # The first LIST also makes the agent resync at once: undo may act now.
            if policies != self._objects or not self.confirmed.is_set():
                self._objects = policies
                self._changed = True
            self.confirmed.set()

    def settled(self) -> bool:
        """Confirmed by the API, and no change waiting for the agent to take it."""
        with self._lock:
            return self.confirmed.is_set() and not self._changed

    def __call__(self) -> Sequence[NodeMemoryPolicy] | None:
        with self._lock:
            if not self._changed:
                return None
            self._changed = False
            policies = sorted(self._objects.values(), key=lambda p: p.name)
        if self.state_dir is not None:
            try:
                self.state_dir.save_policies(policies)
            except OSError as exc:
                log.error("cannot save policies to %s: %s", self.state_dir.path, exc)
        return policies


def policy_feed(
    api: RawApi,
    policies: ClusterPolicies,
    *,
    relist_seconds: float,
    metrics: AgentMetrics | None = None,
) -> ListWatch:
    """The list-watch loop that feeds `policies` (start it with `.start(stop)`)."""

    def on_list(items: list[dict[str, Any]]) -> None:
        # The loop's LIST and its watch run in one thread, so no event can land between
        # sending the LIST and its answer; numbered all the same (replace_all's rule).
        policies.replace_all(items, since=policies.events_seen())

    return ListWatch(
        api,
        POLICIES_PATH,
        on_list=on_list,
        on_event=policies.on_event,
        operation="watch policies",
        relist_seconds=relist_seconds,
        metrics=metrics,
    )
