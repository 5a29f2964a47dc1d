"""The rules handed to the NRI plugin: pod-only rules in merge order, up to the first one
the plugin cannot decide or apply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from nodemem.agent.nri_rules import nri_rules, write_nri_rules
from nodemem.api.manifest import load_policies
from nodemem.policy.effective import effective_policy


def rules_of(*oom: dict[str, Any], dry_run: bool = False) -> Any:
    document = {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryPolicy",
        "metadata": {"name": "p"},
        "spec": {"dryRun": dry_run, "oom": list(oom)},
    }
    return effective_policy(load_policies(yaml.safe_dump(document)), {}, 1 << 30).oom


def rule(name: str, value: int, **match: Any) -> dict[str, Any]:
    return {"name": name, "match": match, "oomScoreAdj": value}


BATCH = {"matchLabels": {"tier": "batch"}}


def test_pod_only_rules_are_passed_in_order() -> None:
    rules = rules_of(
        rule("a", 900, namespace="batch", labelSelector=BATCH),
        rule("b", 500, namespace="web"),
        rule("c", 300, labelSelector=BATCH),
    )
    assert nri_rules(rules, negative_allowed=True) == [
        {"oomScoreAdj": 900, "namespace": "batch", "matchLabels": {"tier": "batch"}},
        {"oomScoreAdj": 500, "namespace": "web"},
        {"oomScoreAdj": 300, "matchLabels": {"tier": "batch"}},
    ]


def test_the_list_stops_at_a_rule_the_plugin_cannot_decide() -> None:
    for undecidable in (
        {"namespace": "batch", "comm": "^java$"},
        {"cmdline": "train"},
        {"namespace": "batch", "container": "main"},
        {"namespace": "batch", "qosClass": "Burstable"},
        {"labelSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]}},
    ):
        rules = rules_of(
            rule("first", 900, namespace="batch"),
            rule("process", 100, **undecidable),
            rule("later", 500, namespace="web"),
        )
        # Past it, "later" might take a process the agent gives "process".
        assert nri_rules(rules, negative_allowed=True) == [
            {"oomScoreAdj": 900, "namespace": "batch"}
        ], undecidable


def test_a_negative_value_without_cap_sys_resource_stops_the_list() -> None:
    rules = rules_of(rule("protect", -500, namespace="db"), rule("later", 500, namespace="web"))
    assert nri_rules(rules, negative_allowed=False) == []
    assert nri_rules(rules, negative_allowed=True)[0] == {"oomScoreAdj": -500, "namespace": "db"}


def test_dry_run_rules_are_not_applied_by_the_plugin() -> None:
    assert (
        nri_rules(rules_of(rule("a", 900, namespace="x"), dry_run=True), negative_allowed=True)
        == []
    )


def test_the_file_is_replaced_whole_and_a_failure_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    assert write_nri_rules(path, [{"oomScoreAdj": 900, "namespace": "x"}])
    assert json.loads(path.read_text()) == [{"oomScoreAdj": 900, "namespace": "x"}]
    assert [p.name for p in tmp_path.iterdir()] == ["rules.json"]
    assert not write_nri_rules(tmp_path / "missing" / "rules.json", [])
