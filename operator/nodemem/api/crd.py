"""The two CustomResourceDefinitions, generated from the pydantic models.

The models' JSON schemas become structural OpenAPI v3 schemas (refs inlined, Optional
fields made plain optional fields, int-or-string in the one form the API server accepts),
and the generator adds what JSON Schema cannot say: list types for merging, CEL rules for
the cross-field checks the models make in validators, and printer columns. Pure: writing
the files is the CLI's job (`nodemem crds`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Final

import yaml
from pydantic import BaseModel

from .policy import NodeMemoryPolicy, OomMatch
from .quantity import PERCENT_PATTERN
from .status import NodeMemoryPolicyStatus, NodeMemoryReportStatus

__all__ = [
    "GROUP",
    "POLICY_CRD_FILE",
    "REPORT_CRD_FILE",
    "VERSION",
    "policy_crd",
    "render_crds",
    "report_crd",
]

GROUP: Final = "nodemem.dev"
VERSION: Final = "v1alpha1"
POLICY_CRD_FILE: Final = f"{GROUP}_nodememorypolicies.yaml"
REPORT_CRD_FILE: Final = f"{GROUP}_nodememoryreports.yaml"

Schema = dict[str, Any]

_HEADER = "# Generated from the pydantic models in nodemem.api by `nodemem crds`. Do not edit.\n"

# The lists CEL rules iterate are bounded in the models (maxItems comes from there): the API
# server counts an unbounded list as about a million items, which would put the item rules
# over the per-rule cost limit of 10^7.

# JSONSchemaProps keys a generated node may carry; anything else from pydantic is a bug here.
_ALLOWED_KEYS: Final[tuple[str, ...]] = (
    "description",
    "type",
    "format",
    "enum",
    "pattern",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "default",
    "anyOf",
    "items",
    "properties",
    "additionalProperties",
    "required",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
)
_INT32: Final = (-(2**31), 2**31 - 1)
_INT64: Final = (-(2**63), 2**63 - 1)


def policy_crd() -> dict[str, Any]:
    """The NodeMemoryPolicy CRD (`nmp`), as a dict ready for YAML or the API."""
    model = NodeMemoryPolicy.model_json_schema(by_alias=True, mode="validation")
    defs = model.get("$defs", {})
    spec = _structural(model["properties"]["spec"], defs, keep_defaults=True)
    _add_extras(spec, _policy_spec_extras(), "spec")
    return _crd(
        kind="NodeMemoryPolicy",
        plural="nodememorypolicies",
        short_name="nmp",
        description=model["description"],
        spec=spec,
        status=_status_schema(NodeMemoryPolicyStatus),
        columns=[
            _column(
                "Priority", "integer", ".spec.priority", "Wins item by item when policies overlap."
            ),
            _column("Matched", "integer", ".status.nodes.matched", "Nodes selected."),
            _column("Applied", "integer", ".status.nodes.applied", "Nodes in force."),
            _column("Failed", "integer", ".status.nodes.failed", "Nodes with failed items."),
            _column(
                "Unaccounted",
                "integer",
                ".status.shmem.unaccountedBytes",
                "Unaccounted Shmem bytes, summed over the matched nodes.",
            ),
            _AGE_COLUMN,
        ],
    )


def report_crd() -> dict[str, Any]:
    """The NodeMemoryReport CRD (`nmr`): one per node, status only."""
    return _crd(
        kind="NodeMemoryReport",
        plural="nodememoryreports",
        short_name="nmr",
        description="A NodeMemoryReport: one per node, named after it and written by its "
        "agent only: where the node's memory is, the Shmem no process accounts for, and what "
        "the policies did.",
        spec=None,
        status=_status_schema(NodeMemoryReportStatus),
        columns=[
            _column("Shmem", "integer", ".status.shmem.totalBytes", "Shmem bytes."),
            _column(
                "Unaccounted",
                "integer",
                ".status.shmem.unaccountedBytes",
                "Shmem bytes no object accounts for.",
            ),
            _column(
                "Applied",
                "string",
                '.status.conditions[?(@.type=="Applied")].status',
                "Whether the policies are in force.",
            ),
            _AGE_COLUMN,
        ],
    )


def render_crds() -> dict[str, str]:
    """File name in `crds/` -> YAML text, for both CRDs; byte-for-byte what is committed."""
    return {
        POLICY_CRD_FILE: _HEADER + _dump(policy_crd()),
        REPORT_CRD_FILE: _HEADER + _dump(report_crd()),
    }


# --- CEL rules -------------------------------------------------------------------------
# Kubernetes CEL, with its string extensions: the tests judge the rules by a real API server.


def _cel_string(text: str) -> str:
    """`text` as a CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _percent_below_rule(lower: str, upper: str) -> str:
    """`lower` < `upper` for two percents ("12.5%"), compared as doubles.

    Values the schema's pattern refuses are left to it (a double() of them would add an
    evaluation error to the pattern's own). The models compare the same doubles, so the
    two agree even where doubles cannot tell 49.99999999999999999% from 50%.
    """
    low, high = f"self.{lower}", f"self.{upper}"
    percent = _cel_string(PERCENT_PATTERN)
    return (
        f"!has({low}) || !has({high})"
        f" || !{low}.matches({percent}) || !{high}.matches({percent})"
        f" || double({low}.replace('%', '')) < double({high}.replace('%', ''))"
    )


def _rule(rule: str, message: str, field_path: str | None = None) -> Schema:
    return {"rule": rule, "message": message} | ({"fieldPath": field_path} if field_path else {})


def _policy_spec_extras() -> dict[str, Schema]:
    """Additions to the spec schema, by path (`a.b` property, `a[]` list item, `` spec)."""
    criteria = [field.alias or name for name, field in OomMatch.model_fields.items()]
    has_criterion = " || ".join(f"has(self.{criterion})" for criterion in criteria)
    selector_values = _rule(
        "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0"
        " : !has(self.values) || size(self.values) == 0",
        "In and NotIn need at least one value; Exists and DoesNotExist take none",
        ".values",
    )
    return {
        "": {"x-kubernetes-validations": [_TMPFS_PATHS_UNIQUE]},
        "nodeSelector.matchExpressions[]": {"x-kubernetes-validations": [selector_values]},
        # Not a list map keyed by path: a podShm item has no path, and map keys must be
        # required. Items are then replaced as a whole list by server-side apply.
        "tmpfs": {"x-kubernetes-list-type": "atomic"},
        "tmpfs[]": {
            "x-kubernetes-validations": [
                _rule(
                    "has(self.path) != (has(self.podShm) && self.podShm)",
                    "needs exactly one of path and podShm: true",
                ),
                _rule(
                    "!has(self.podShm) || !self.podShm || has(self.pods)",
                    "podShm needs pods: the pods whose /dev/shm is sized ({}: every pod)",
                ),
                _rule(
                    "!has(self.podShm) || !self.podShm"
                    " || !has(self.pods) || !has(self.pods.volume)",
                    "pods.volume does not apply to podShm: /dev/shm is not a volume",
                    ".pods.volume",
                ),
            ]
        },
        "cleanup": _list_map("name"),
        "cleanup[]": {
            "x-kubernetes-validations": [
                _rule(
                    "has(self.olderThan) || has(self.whenUsageAbove)",
                    "needs olderThan or whenUsageAbove: without either the rule would remove "
                    "every matching file",
                ),
                _rule(
                    "!has(self.targetUsage) || has(self.whenUsageAbove)",
                    "needs whenUsageAbove",
                    ".targetUsage",
                ),
                _rule(
                    _percent_below_rule("targetUsage", "whenUsageAbove"),
                    "must be lower than whenUsageAbove",
                    ".targetUsage",
                ),
            ]
        },
        "oom": _list_map("name"),
        "oom[]": {
            "x-kubernetes-validations": [
                _rule(
                    "self.oomScoreAdj != -1000 || (has(self.allowUnkillable) && "
                    "self.allowUnkillable)",
                    "-1000 makes processes unkillable; it needs allowUnkillable: true",
                    ".oomScoreAdj",
                )
            ]
        },
        "oom[].match": {
            "x-kubernetes-validations": [
                _rule(has_criterion, f"needs at least one of {', '.join(criteria)}")
            ]
        },
        "oom[].match.labelSelector.matchExpressions[]": {
            "x-kubernetes-validations": [selector_values]
        },
    }


# What a list map keyed by path did before podShm items (which have none) existed.
_TMPFS_PATHS_UNIQUE: Final = _rule(
    "!has(self.tmpfs) || self.tmpfs.all(a, has(a.path)"
    " ? self.tmpfs.filter(b, has(b.path)).exists_one(b, b.path == a.path) : true)",
    "tmpfs items must have unique paths",
    ".tmpfs",
)


def _list_map(*keys: str) -> Schema:
    """A list merged item by item on `keys` (server-side apply, strategic merge)."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


# --- the CRD around the schemas --------------------------------------------------------


def _crd(
    *,
    kind: str,
    plural: str,
    short_name: str,
    description: str,
    spec: Schema | None,
    status: Schema,
    columns: list[Schema],
) -> dict[str, Any]:
    properties: Schema = {
        "apiVersion": {
            "description": "APIVersion defines the versioned schema of this representation "
            "of an object.",
            "type": "string",
        },
        "kind": {
            "description": "Kind is a string value representing the REST resource this object "
            "represents.",
            "type": "string",
        },
        "metadata": {"type": "object"},
    }
    if spec is not None:
        properties["spec"] = spec
    properties["status"] = status
    root: Schema = {"description": description, "type": "object", "properties": properties}
    if spec is not None:
        root["required"] = ["spec"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": ["nodemem"],
            },
            "scope": "Cluster",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def _column(name: str, type_: str, json_path: str, description: str) -> Schema:
    return {"name": name, "type": type_, "jsonPath": json_path, "description": description}


_AGE_COLUMN: Final[Schema] = {
    "name": "Age",
    "type": "date",
    "jsonPath": ".metadata.creationTimestamp",
}


def _status_schema(model: type[BaseModel]) -> Schema:
    # No defaults in status: the API server would fill them into what the writers read back,
    # and a writer comparing its own dump with the stored object would see a change forever.
    raw = model.model_json_schema(by_alias=True, mode="validation")
    status = _structural(raw, raw.get("$defs", {}), keep_defaults=False)
    _add_extras(status, {"conditions": _list_map("type")}, "status")
    return status


# --- pydantic JSON Schema -> structural schema -----------------------------------------


def _structural(node: Schema, defs: Mapping[str, Schema], *, keep_defaults: bool) -> Schema:
    """One JSON Schema node of pydantic's, as a structural OpenAPI v3 node (recursively)."""
    node = dict(node)
    if "$ref" in node:  # inline: structural schemas have no references
        target = copy.deepcopy(defs[node.pop("$ref").removeprefix("#/$defs/")])
        node = {**target, **node}  # the field's own description wins over the class's
        return _structural(node, defs, keep_defaults=keep_defaults)
    if "anyOf" in node and {"type": "null"} in node["anyOf"]:
        # Optional: absent, never null. The API server prunes a null in a field that is not
        # nullable, which is what the models mean by None; a stored null would reach the CEL
        # rules (has() would be true) and fail them.
        branches = [branch for branch in node.pop("anyOf") if branch != {"type": "null"}]
        if node.get("default", ...) is None:
            del node["default"]
        if len(branches) != 1:
            raise ValueError(f"a union has no structural form: {branches}")
        return _structural({**branches[0], **node}, defs, keep_defaults=keep_defaults)
    if node.get("x-kubernetes-int-or-string"):
        _hoist_int_or_string(node)
    elif "anyOf" in node:
        raise ValueError(f"a union has no structural form: {node['anyOf']}")

    node.pop("title", None)
    node.pop("$defs", None)
    if "default" in node and not (keep_defaults and _is_scalar(node["default"])):
        del node["default"]
    if node.get("additionalProperties") is False:  # unknown fields are pruned or refused anyway
        del node["additionalProperties"]
    if node.pop("uniqueItems", False):
        node.setdefault("x-kubernetes-list-type", "set")
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):  # OpenAPI v3.0: a flag on the bound
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node[bound.replace("exclusiveM", "m")] = node[bound]
            node[bound] = True
    if "properties" in node:
        node["properties"] = {
            name: _structural(child, defs, keep_defaults=keep_defaults)
            for name, child in node["properties"].items()
        }
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = _structural(node[key], defs, keep_defaults=keep_defaults)
    if node.get("type") == "integer" and "format" not in node:
        low, high = node.get("minimum"), node.get("maximum")
        fits_int32 = low is not None and high is not None and _INT32[0] <= low <= high <= _INT32[1]
        node["format"] = "int32" if fits_int32 else "int64"
    if node.get("type") == "integer":
        for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            # The API server holds bounds as float64 and refuses every value of an int64
            # field whose bound no longer converts back to int64 (2**63 - 1 rounds up to
            # 2**63). The int64 type is that bound anyway.
            if bound in node and not _INT64[0] <= float(node[bound]) <= _INT64[1]:
                del node[bound]
                node.pop(flag, None)
    unknown = set(node) - set(_ALLOWED_KEYS)
    if unknown:
        raise ValueError(f"no structural form for {sorted(unknown)} in {node}")
    _reorder(node)
    return node


def _reorder(node: Schema) -> None:
    """Keys in one fixed order, so that the YAML reads the same everywhere."""
    ordered = {key: node[key] for key in _ALLOWED_KEYS if key in node}
    node.clear()
    node.update(ordered)


def _hoist_int_or_string(node: Schema) -> None:
    """The API server accepts int-or-string only as `anyOf: [{type: integer}, {type: string}]`
    exactly; per-type checks (minimum, pattern) move up, where they apply to their type only."""
    branches = node.pop("anyOf")
    if sorted(branch.get("type") for branch in branches) != ["integer", "string"]:
        raise ValueError(f"int-or-string needs an integer and a string branch: {branches}")
    for branch in branches:
        for key, value in branch.items():
            if key == "type":
                continue
            if key in node:
                raise ValueError(f"int-or-string: {key} is set twice in {node}")
            node[key] = value
    node["anyOf"] = [{"type": "integer"}, {"type": "string"}]


def _is_scalar(value: object) -> bool:
    return isinstance(value, bool | int | float | str)


def _add_extras(schema: Schema, extras: Mapping[str, Schema], root: str) -> None:
    for path, extra in extras.items():
        node = schema
        for part in path.split(".") if path else ():  # "": the schema itself
            name, items = (part[:-2], True) if part.endswith("[]") else (part, False)
            try:
                node = node["properties"][name]
                if items:
                    node = node["items"]
            except KeyError:
                raise KeyError(f"{root}.{path}: no such field in the models") from None
        for key, value in extra.items():
            if key in node and node[key] != value:
                raise ValueError(f"{root}.{path}: {key} is already {node[key]!r}")
            node[key] = copy.deepcopy(value)
        _reorder(node)


# --- YAML ------------------------------------------------------------------------------


def _dump(document: Mapping[str, Any]) -> str:
    return yaml.safe_dump(
        document,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )
