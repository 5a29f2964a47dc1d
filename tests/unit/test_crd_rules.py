"""The CRDs' CEL rules and schema constraints, and the validator that checks them.

Broken manifests in tests/data/broken (one per rule or constraint, each naming the field
it must be refused for), the percent comparison against exact arithmetic, the bounds the
API server's CEL cost estimate needs, and the validator's API-server semantics (transition
rules, status subresource, pruning, blocking type errors, structural-schema checks).
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kube.crd_schema import CrdValidator, structural_errors
from nodemem.api.crd import policy_crd
from nodemem.api.manifest import PolicyError, validate_policy

BROKEN = sorted((Path(__file__).resolve().parents[1] / "data" / "broken").glob("*.yaml"))
POLICY = CrdValidator(policy_crd())
_EXPECT = re.compile(r"^# expect: (\S+)$", re.MULTILINE)


def _schema_nodes(node: dict[str, Any], lists: tuple[dict[str, Any], ...] = ()) -> Any:
    """(node, enclosing list schemas) for every node of a schema."""
    yield node, lists
    for child in node.get("properties", {}).values():
        yield from _schema_nodes(child, lists)
    if "items" in node:
        yield from _schema_nodes(node["items"], (*lists, node))


def _rule_nodes() -> list[tuple[dict[str, Any], tuple[dict[str, Any], ...]]]:
    [version] = policy_crd()["spec"]["versions"]
    root = version["schema"]["openAPIV3Schema"]
    return [(n, lists) for n, lists in _schema_nodes(root) if "x-kubernetes-validations" in n]


# --- broken manifests ------------------------------------------------------------------


@pytest.mark.parametrize("path", BROKEN, ids=[path.stem for path in BROKEN])
def test_broken_manifest_is_refused_naming_the_field(path: Path) -> None:
    text = path.read_text()
    [expected] = _EXPECT.findall(text)
    errors = POLICY.validate(yaml.safe_load(text))
    assert errors
    # One problem per manifest: every error names that field (but the server's note that
    # a type error kept the CEL rules from running).
    assert all(e.startswith((f"{expected}: ", "<nil>: ")) for e in errors), errors
    assert errors[0].startswith(f"{expected}: ")


@pytest.mark.parametrize("path", BROKEN, ids=[path.stem for path in BROKEN])
def test_broken_manifest_is_refused_by_the_models_too(path: Path) -> None:
    # The CRD must never be stricter than the models on what it refuses.
    with pytest.raises(PolicyError):
        validate_policy(yaml.safe_load(path.read_text()))


def test_every_cel_rule_has_a_broken_manifest() -> None:
    errors = {
        error for path in BROKEN for error in POLICY.validate(yaml.safe_load(path.read_text()))
    }
    messages = {
        rule["message"] for node, _ in _rule_nodes() for rule in node["x-kubernetes-validations"]
    }
    untested = {m for m in messages if not any(error.endswith(f": {m}") for error in errors)}
    assert untested == set()


# --- the percent comparison ------------------------------------------------------------

percents = st.builds(
    "{}{}%".format,
    st.from_regex(r"[0-9]{1,4}", fullmatch=True),
    st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,3}", fullmatch=True)),
)


def _refuses_target(trigger: str, target: str) -> bool:
    rule: dict[str, Any] = {"name": "c", "paths": ["/x/y"], "schedule": "* * * * *"}
    rule |= {"whenUsageAbove": trigger, "targetUsage": target}
    manifest: dict[str, Any] = {"apiVersion": "nodemem.dev/v1alpha1", "kind": "NodeMemoryPolicy"}
    manifest |= {"metadata": {"name": "p"}, "spec": {"cleanup": [rule]}}
    errors = POLICY.validate(manifest)
    return any(error.endswith("must be lower than whenUsageAbove") for error in errors)


@settings(max_examples=300, deadline=None)
@given(percents, percents)
def test_target_below_trigger_rule_agrees_with_exact_arithmetic(trigger: str, target: str) -> None:
    below = Decimal(target[:-1]) < Decimal(trigger[:-1])
    refused = _refuses_target(trigger, target)
    assert not (refused and below), "the rule refused a target that is lower"
    judged = re.match(r"^[0-9]{1,3}[.%]", target) and re.match(
        r"^[0-9]{1,3}([.][0-9]*[1-9])?%$", trigger
    )
    if judged:
        assert refused == (not below)


@pytest.mark.parametrize(
    ("trigger", "target", "refused"),
    [
        ("80%", "85%", True),
        ("80%", "80%", True),
        ("80%", "79.99%", False),
        ("9%", "10%", True),
        ("10%", "9%", False),
        ("100%", "99.9%", False),
        ("12%", "12.5%", True),
        ("12.5%", "12%", False),
        ("12.5%", "12.50%", True),
        ("12%", "12.0%", True),
        ("0.5%", "0.25%", False),
        ("50%", "050%", True),
        ("50%", "049%", False),
    ],
)
def test_target_below_trigger_examples(trigger: str, target: str, refused: bool) -> None:
    assert _refuses_target(trigger, target) is refused


# --- rules a real API server would accept ----------------------------------------------

# Kubernetes' CEL extensions that cel-python lacks: a rule using one could not be tested.
_EXTENSIONS = re.compile(
    r"\.(replace|split|substring|lowerAscii|upperAscii|indexOf|lastIndexOf|join|trim|charAt"
    r"|isSorted|sum|min|max|find|findAll|format|quote|reverse)\(|\?\.|orValue|quantity\(|"
    r"isQuantity|url\(|ip\(|cidr\("
)


def test_rules_use_only_standard_cel() -> None:
    for node, _ in _rule_nodes():
        for rule in node["x-kubernetes-validations"]:
            assert _EXTENSIONS.search(rule["rule"]) is None, rule["rule"]


def test_rules_read_only_fields_their_node_declares() -> None:
    # A stand-in for the API server's CEL type check, which refuses unknown fields.
    for node, _ in _rule_nodes():
        for rule in node["x-kubernetes-validations"]:
            for name in re.findall(r"\bself\.(\w+)", rule["rule"]):
                assert name in node["properties"], (name, rule["rule"])


def test_rules_are_bounded_for_the_cost_estimate() -> None:
    # The server multiplies a rule's cost by how often it can run: every enclosing list
    # needs maxItems; every string a rule reads (beyond has(), which costs 1) needs
    # maxLength or an enum.
    for node, lists in _rule_nodes():
        runs = 1
        for enclosing in lists:
            assert "maxItems" in enclosing, node.get("description")
            runs *= enclosing["maxItems"]
        assert runs <= 64 * 32
        for rule in node["x-kubernetes-validations"]:
            read = re.sub(r"has\(self\.\w+\)", "", rule["rule"])
            for name in re.findall(r"\bself\.(\w+)", read):
                field = node["properties"][name]
                if field.get("type") == "string":
                    assert "maxLength" in field or "enum" in field, name


# --- the validator's API-server semantics ----------------------------------------------


def _crd(spec: dict[str, Any], *, status: dict[str, Any] | None = None) -> dict[str, Any]:
    properties: dict[str, Any] = {"metadata": {"type": "object"}, "spec": spec}
    if status is not None:
        properties["status"] = status
    version: dict[str, Any] = {
        "name": "v1",
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": {"type": "object", "properties": properties}},
    }
    if status is not None:
        version["subresources"] = {"status": {}}
    return {"spec": {"versions": [version]}}


def _object(spec: Any, status: Any = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"}}
    obj["spec"] = spec
    return obj | ({"status": status} if status is not None else {})


ITEMS_SPEC: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {
            "type": "string",
            "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "immutable"}],
        },
        "items": {
            "type": "array",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["key"],
            "items": {
                "type": "object",
                "required": ["key"],
                "properties": {"key": {"type": "string"}, "size": {"type": "integer"}},
                "x-kubernetes-validations": [
                    {
                        "rule": "self.size >= oldSelf.size",
                        "messageExpression": "'may not shrink below ' + string(oldSelf.size)",
                        "fieldPath": ".size",
                    }
                ],
            },
        },
    },
}


def test_transition_rules_run_on_updates_of_correlated_values_only() -> None:
    validator = CrdValidator(_crd(ITEMS_SPEC))
    old = _object({"name": "a", "items": [{"key": "x", "size": 5}]})
    assert validator.validate(_object({"name": "b", "items": [{"key": "x", "size": 1}]})) == []
    errors = validator.validate(
        _object({"name": "b", "items": [{"key": "y", "size": 1}, {"key": "x", "size": 4}]}), old
    )
    assert errors == [
        'spec.name: Invalid value: "string": immutable',
        'spec.items[1].size: Invalid value: "object": may not shrink below 5',
    ]


def test_status_subresource_judges_only_what_the_endpoint_changes() -> None:
    status = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0}}}
    validator = CrdValidator(_crd(ITEMS_SPEC, status=status))
    stored = _object({"name": "a"}, {"count": 1})
    bad_status = _object({"name": "a"}, {"count": -1})
    assert validator.validate(bad_status, stored) == []  # main endpoint: status ignored
    assert validator.validate(bad_status, stored, subresource="status") == [
        "status.count: Invalid value: -1: should be greater than or equal to 0"
    ]
    renamed = _object({"name": "b"}, {"count": 2})
    assert validator.validate(renamed, stored, subresource="status") == []  # spec ignored


def test_unknown_fields_are_refused_and_pruned_unless_preserved() -> None:
    spec = {
        "type": "object",
        "properties": {
            "known": {"type": "string"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    validator = CrdValidator(_crd(spec))
    obj = _object({"known": "k", "typo": 1, "free": {"any": 1}, "labels": {"a": "b"}})
    assert validator.validate(obj) == ["spec.typo: Unknown field: field not declared in schema"]
    assert validator.prune(obj)["spec"] == {"known": "k", "free": {"any": 1}, "labels": {"a": "b"}}


def test_null_is_pruned_unless_the_field_is_nullable() -> None:
    spec = {
        "type": "object",
        "properties": {
            "plain": {"type": "string"},
            "nullable": {"type": "string", "nullable": True},
        },
        "x-kubernetes-validations": [{"rule": "!has(self.plain)", "message": "plain is set"}],
    }
    validator = CrdValidator(_crd(spec))
    obj = _object({"plain": None, "nullable": None})
    assert validator.validate(obj) == []
    assert validator.prune(obj)["spec"] == {"nullable": None}


def test_type_errors_block_the_rules_as_on_the_server() -> None:
    spec = copy.deepcopy(ITEMS_SPEC)
    spec["x-kubernetes-validations"] = [{"rule": "false", "message": "never"}]
    validator = CrdValidator(_crd(spec))
    assert validator.validate(_object({"items": []})) == ['spec: Invalid value: "object": never']
    errors = validator.validate(_object({"items": "none"}))
    assert errors[0] == 'spec.items: Invalid value: "string": must be of type array'
    assert errors[1].startswith("<nil>: ") and "validation rules were not checked" in errors[1]


def test_defaults_are_applied_before_the_rules() -> None:
    spec = {
        "type": "object",
        "properties": {"replicas": {"type": "integer", "default": 1}},
        "x-kubernetes-validations": [
            {"rule": "self.replicas > 0", "reason": "FieldValueForbidden"}
        ],
    }
    validator = CrdValidator(_crd(spec))
    assert validator.apply_defaults(_object({}))["spec"] == {"replicas": 1}
    assert validator.validate(_object({})) == []
    assert validator.validate(_object({"replicas": 0})) == [
        "spec: Forbidden: failed rule: self.replicas > 0"
    ]


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({"properties": {"a": {"type": "string"}}}, ".type: Required value"),
        ({"type": "object", "properties": {"a": {"$ref": "#/x"}}}, "properties[a].$ref"),
        ({"type": "object", "additionalProperties": False}, ".additionalProperties: Forbidden"),
        ({"type": "array", "uniqueItems": True, "items": {"type": "string"}}, "uniqueItems"),
        ({"type": "array", "items": {"type": "string", "const": "a"}}, "items.const"),
        (
            # pydantic's int-or-string: checks inside the branches are not the allowed form
            {
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}],
            },
            ".anyOf[0].type: Forbidden",
        ),
        (
            {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["k"],
                "items": {"type": "object", "properties": {"k": {"type": "string"}}},
            },
            "'k' must be required",
        ),
        (
            {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "object"}},
            "set items must be scalars",
        ),
        ({"type": "integer", "default": "one"}, ".default: Invalid value"),
        (
            {"type": "object", "x-kubernetes-validations": [{"rule": "self.a ==", "message": "m"}]},
            "compilation failed",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "x-kubernetes-validations": [{"rule": "true", "fieldPath": ".b"}],
            },
            ".fieldPath: Invalid value",
        ),
        (
            {"type": "object", "x-kubernetes-validations": [{"rule": "true", "messag": "m"}]},
            ".messag: Forbidden",
        ),
    ],
)
def test_structural_errors_name_what_the_server_would_refuse(
    node: dict[str, Any], expected: str
) -> None:
    schema = {"type": "object", "properties": {"spec": node}}
    errors = structural_errors(schema)
    assert any(expected in error for error in errors), errors
