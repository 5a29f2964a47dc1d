"""The chart's ValidatingAdmissionPolicy, evaluated as the API server would: CEL by cel-python.

The policy is taken from the chart as real Helm renders it. Each admission request goes
through the same steps as in kube-apiserver: the resource rules of matchConstraints, then
the matchConditions (a false one means the policy does not apply), then the variables in
order, then each validation; an evaluation error counts as a failure, which
`failurePolicy: Fail` turns into a denial.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import helm_python as helm
import pytest
import yaml
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

CHART = Path(__file__).resolve().parents[2] / "charts" / "nodemem"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"

Obj = dict[str, Any]


def rendered_objects(values: Obj | None = None, *, release: str, namespace: str) -> list[Obj]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=release, namespace=namespace)
    return [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def admission_objects(release: str = "nodemem", namespace: str = "nodemem-system") -> list[Obj]:
    return [
        o
        for o in rendered_objects(release=release, namespace=namespace)
        if o["kind"].startswith("ValidatingAdmissionPolicy")
    ]


@dataclass(frozen=True)
class Decision:
    outcome: str  # "not matched", "allowed" or "denied"
    message: str = ""


class AdmissionPolicy:
    """One ValidatingAdmissionPolicy, its CEL compiled once with cel-python."""

    def __init__(self, policy: Obj) -> None:
        self.spec = policy["spec"]
        self.env = celpy.Environment()
        self.programs: dict[str, celpy.Runner] = {}

    def _run(self, expression: str, activation: Obj) -> Any:
        if expression not in self.programs:
            self.programs[expression] = self.env.program(self.env.compile(expression))
        result = self.programs[expression].evaluate(activation)
        if isinstance(result, CELEvalError):
            raise result
        return result

    def _matches_rules(self, request: Obj) -> bool:
        resource = request["resource"]["resource"]
        if request.get("subResource"):
            resource = f"{resource}/{request['subResource']}"
        for rule in self.spec["matchConstraints"]["resourceRules"]:
            if (
                request["resource"]["group"] in rule["apiGroups"]
                and request["operation"] in rule["operations"]
                and resource in rule["resources"]
            ):
                return True
        return False

    def admit(self, request: Obj, obj: Obj | None, old: Obj | None) -> Decision:
        if not self._matches_rules(request):
            return Decision("not matched")
        activation: Obj = {
            "request": json_to_cel(request),
            "object": json_to_cel(obj),
            "oldObject": json_to_cel(old),
        }
        try:
            for condition in self.spec.get("matchConditions", []):
                if not bool(self._run(condition["expression"], activation)):
                    return Decision("not matched")
            variables: Obj = {}
            for variable in self.spec.get("variables", []):
                activation["variables"] = json_to_cel(variables)
                variables[variable["name"]] = self._run(variable["expression"], activation)
            activation["variables"] = json_to_cel(variables)
            for validation in self.spec["validations"]:
                if not bool(self._run(validation["expression"], activation)):
                    message = self._run(validation["messageExpression"], activation)
                    return Decision("denied", str(message))
        except CELEvalError as error:
            assert self.spec["failurePolicy"] == "Fail"
            return Decision("denied", f"evaluation error: {error}")
        return Decision("allowed")


AGENT = "system:serviceaccount:nodemem-system:nodemem-agent"
CONTROLLER = "system:serviceaccount:nodemem-system:nodemem-controller"


def agent_token(node: str | None, **more: list[str]) -> Obj:
    """userInfo of a pod-bound ServiceAccount token, as the API server fills it in."""
    extra: Obj = {"authentication.kubernetes.io/credential-id": ["JTI=0d4c6b1e"]}
    if node is not None:
        extra |= {
            NODE_NAME_KEY: [node],
            "authentication.kubernetes.io/node-uid": [f"uid-{node}"],
            "authentication.kubernetes.io/pod-name": [f"nodemem-agent-{node}"],
            "authentication.kubernetes.io/pod-uid": ["7f1c"],
        }
    extra |= more
    return {
        "username": AGENT,
        "uid": "3b0e",
        "groups": [
            "system:serviceaccounts",
            "system:serviceaccounts:nodemem-system",
            "system:authenticated",
        ],
        "extra": extra,
    }


def report(name: str) -> Obj:
    return {
        "apiVersion": "nodemem.dev/v1alpha1",
        "kind": "NodeMemoryReport",
        "metadata": {"name": name},
        "status": {},
    }


def request(
    operation: str, name: str, user: Obj, *, subresource: str = "", resource: str = ""
) -> Obj:
    return {
        "uid": "c4a5",
        "kind": {"group": "nodemem.dev", "version": "v1alpha1", "kind": "NodeMemoryReport"},
        "resource": {
            "group": "nodemem.dev",
            "version": "v1alpha1",
            "resource": resource or "nodememoryreports",
        },
        "subResource": subresource,
        "name": name,
        "operation": operation,
        "userInfo": user,
        "dryRun": False,
    }


def admit(
    policy: AdmissionPolicy, operation: str, name: str, user: Obj, subresource: str = ""
) -> Decision:
    """A write of report `name`: CREATE has only `object`, DELETE only `oldObject`."""
    obj = None if operation == "DELETE" else report(name)
    old = None if operation == "CREATE" else report(name)
    return policy.admit(request(operation, name, user, subresource=subresource), obj, old)


@pytest.fixture(scope="module")
def policy() -> AdmissionPolicy:
    (vap,) = [o for o in admission_objects() if o["kind"] == "ValidatingAdmissionPolicy"]
    return AdmissionPolicy(vap)


def test_agent_may_create_its_own_nodes_report(policy: AdmissionPolicy) -> None:
    assert admit(policy, "CREATE", "node-a", agent_token("node-a")) == Decision("allowed")


def test_agent_may_patch_the_status_of_its_own_nodes_report(policy: AdmissionPolicy) -> None:
    decision = admit(policy, "UPDATE", "node-a", agent_token("node-a"), subresource="status")
    assert decision == Decision("allowed")


def test_agent_may_not_create_another_nodes_report(policy: AdmissionPolicy) -> None:
    decision = admit(policy, "CREATE", "node-b", agent_token("node-a"))
    assert decision.outcome == "denied"
    assert decision.message == (
        "the nodemem agent of node node-a may only write the NodeMemoryReport named node-a, "
        "not node-b"
    )


def test_agent_may_not_patch_another_nodes_report_or_its_status(policy: AdmissionPolicy) -> None:
    token = agent_token("node-a")
    assert admit(policy, "UPDATE", "node-b", token).outcome == "denied"
    assert admit(policy, "UPDATE", "node-b", token, subresource="status").outcome == "denied"


def test_delete_is_judged_by_the_old_object(policy: AdmissionPolicy) -> None:
    token = agent_token("node-a")
    assert admit(policy, "DELETE", "node-b", token).outcome == "denied"
    assert admit(policy, "DELETE", "node-a", token) == Decision("allowed")


def test_update_renaming_is_impossible_to_sneak_past_by_old_object(
    policy: AdmissionPolicy,
) -> None:
    # UPDATE is judged by the object being written, whatever oldObject says.
    decision = policy.admit(
        request("UPDATE", "node-b", agent_token("node-a")), report("node-b"), report("node-a")
    )
    assert decision.outcome == "denied"


def test_token_without_node_claims_is_denied_with_a_reason(policy: AdmissionPolicy) -> None:
    # A legacy Secret-based token, or a cluster without ServiceAccountTokenPodNodeInfo.
    decision = admit(policy, "CREATE", "node-a", agent_token(None))
    assert decision.outcome == "denied"
    assert "carries no node name" in decision.message
    legacy = {k: v for k, v in agent_token(None).items() if k != "extra"}
    assert admit(policy, "CREATE", "node-a", legacy).outcome == "denied"


def test_token_with_an_ambiguous_node_claim_is_denied(policy: AdmissionPolicy) -> None:
    token = agent_token("node-a")
    token["extra"][NODE_NAME_KEY] = ["node-a", "node-b"]
    assert admit(policy, "CREATE", "node-a", token).outcome == "denied"
    token["extra"][NODE_NAME_KEY] = []
    assert admit(policy, "CREATE", "node-a", token).outcome == "denied"


@pytest.mark.parametrize(
    "username",
    [
        CONTROLLER,  # deletes the reports of deleted nodes
        "kubernetes-admin",
        "system:serviceaccount:other-namespace:nodemem-agent",  # another install's agent
        "system:node:node-a",
    ],
)
def test_requests_of_other_users_are_not_matched(policy: AdmissionPolicy, username: str) -> None:
    user = {"username": username, "groups": ["system:authenticated"]}
    for operation in ("CREATE", "UPDATE", "DELETE"):
        assert admit(policy, operation, "node-b", user) == Decision("not matched")


def test_other_resources_are_not_matched(policy: AdmissionPolicy) -> None:
    for resource in ("nodememorypolicies", "nodememorypolicies/status"):
        plural, _, subresource = resource.partition("/")
        req = request("UPDATE", "x", agent_token("node-a"), subresource=subresource)
        req["resource"]["resource"] = plural
        assert policy.admit(req, report("x"), report("x")) == Decision("not matched")


def test_policy_matches_report_writes_only_and_fails_closed(policy: AdmissionPolicy) -> None:
    spec = policy.spec
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
    objects = {o["kind"]: o for o in admission_objects()}
    binding = objects["ValidatingAdmissionPolicyBinding"]
    assert binding["spec"]["policyName"] == objects["ValidatingAdmissionPolicy"]["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert "paramRef" not in binding["spec"]


def test_match_condition_names_the_agent_of_this_release_and_namespace() -> None:
    (vap,) = [
        o
        for o in admission_objects(release="mem", namespace="ops")
        if o["kind"] == "ValidatingAdmissionPolicy"
    ]
    other = AdmissionPolicy(vap)
    token = agent_token("node-a") | {"username": "system:serviceaccount:ops:mem-nodemem-agent"}
    assert admit(other, "CREATE", "node-b", token).outcome == "denied"
    assert admit(other, "CREATE", "node-b", agent_token("node-a")) == Decision("not matched")
