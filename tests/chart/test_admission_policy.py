"""The chart's ValidatingAdmissionPolicy and its binding, as real Helm renders them.

What the policy decides is tested against the real kube-apiserver, with real tokens, in
tests/kube/test_rbac_admission.py. Here: the parts of the rendered objects that decide
when it applies at all (which requests it matches, who it names, what a failure does),
for this release and for another release name and namespace.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "nodemem"

Obj = dict[str, Any]


def admission_objects(release: str = "nodemem", namespace: str = "nodemem-system") -> Obj:
    """The policy and its binding, by kind."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render({}, name=release, namespace=namespace)
    objects = [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc and doc["kind"].startswith("ValidatingAdmissionPolicy")
    ]
    by_kind = {o["kind"]: o for o in objects}
    assert len(by_kind) == len(objects) == 2, [o["kind"] for o in objects]
    return by_kind


def test_policy_matches_report_writes_only_and_fails_closed() -> None:
    spec = admission_objects()["ValidatingAdmissionPolicy"]["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [
        {
            "apiGroups": ["nodemem.dev"],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE", "DELETE"],
            "resources": ["nodememoryreports", "nodememoryreports/status"],
            "scope": "Cluster",
        }
    ]
    # Every variable a validation or message reads is defined, before it is read.
    defined = [v["name"] for v in spec["variables"]]
    for validation in spec["validations"]:
        for text in (validation["expression"], validation["messageExpression"]):
            assert set(re.findall(r"variables\.(\w+)", text)) <= set(defined)


def test_binding_denies_with_the_policy() -> None:
    objects = admission_objects()
    binding = objects["ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["policyName"] == objects["ValidatingAdmissionPolicy"]["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert "paramRef" not in binding["spec"]


def test_match_condition_names_the_agent_of_this_release_and_namespace() -> None:
    for release, namespace, agent in (
        ("nodemem", "nodemem-system", "nodemem-agent"),
        ("mem", "ops", "mem-nodemem-agent"),
    ):
        objects = admission_objects(release, namespace)
        policy = objects["ValidatingAdmissionPolicy"]
        assert policy["metadata"]["name"] == f"{agent}-own-report"
        assert objects["ValidatingAdmissionPolicyBinding"]["metadata"]["name"] == (
            f"{agent}-own-report"
        )
        assert policy["spec"]["matchConditions"] == [
            {
                "name": "nodemem-agent-only",
                "expression": (
                    f"request.userInfo.username == 'system:serviceaccount:{namespace}:{agent}'"
                ),
            }
        ]
