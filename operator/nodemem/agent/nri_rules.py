"""The oom rules an NRI plugin applies when the runtime creates a container.

The plugin (hack/node/nri, the chart's `nri` sidecar) sets a container's oom_score_adj
before its first process runs, deciding by the pod alone: its namespace and labels. So it
gets, in merge order, the rules that select by those only, and stops at the first rule
it cannot decide (a process criterion, matchExpressions, qosClass, a container name), or
cannot apply (a value below the floor on a node without CAP_SYS_RESOURCE: the runtime
could not set it, and the container would not start). Past such a rule, a later one
might take a process the agent would give the earlier one. The agent stays the authority:
it rewrites every process by the full rules at exec and at each resync.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nodemem.policy.effective import EffectiveOomRule

log = logging.getLogger(__name__)


def nri_rules(rules: Sequence[EffectiveOomRule], *, negative_allowed: bool) -> list[dict[str, Any]]:
    """The plugin's rule list (its JSON form) for `rules` in merge order."""
    found: list[dict[str, Any]] = []
    for rule in rules:
        match = rule.item.match
        selector = match.label_selector
        decidable = (
            match.comm is None
            and match.cmdline is None
            and match.cgroup is None
            and match.container is None
            and match.qos_class is None
            and (selector is None or not selector.match_expressions)
            and (match.namespace is not None or selector is not None)
        )
        if not decidable or rule.dry_run or (rule.item.oom_score_adj < 0 and not negative_allowed):
            break
        entry: dict[str, Any] = {"oomScoreAdj": rule.item.oom_score_adj}
        if match.namespace is not None:
            entry["namespace"] = match.namespace
        if selector is not None and selector.match_labels:
            entry["matchLabels"] = dict(selector.match_labels)
        found.append(entry)
    return found


def write_nri_rules(path: Path, rules: list[dict[str, Any]]) -> bool:
    """Replace the plugin's file at once (a rename: it never reads half a file); False,
    logged, when it cannot be written."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(rules, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.error("cannot write the NRI plugin's rules to %s: %s", path, exc)
        return False
    return True
