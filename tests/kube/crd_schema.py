"""Custom resources checked against their CRD the way the API server checks them.

`CrdValidator(crd).validate(obj, old)` answers what a create or update would be refused
for, each error field path first, worded like the API server's
(`spec.cleanup[0].targetUsage: Invalid value: "string": must be lower than ...`):

- nulls in fields that are not nullable are pruned and defaults applied first;
- the openAPIV3Schema, converted to JSON Schema (int-or-string, nullable), is checked
  with jsonschema, with patterns matched by RE2 (the server's regex engine);
- unknown fields are refused, as with kubectl's default `fieldValidation=Strict`;
- items of `x-kubernetes-list-type` map (by key) and set lists are unique;
- every `x-kubernetes-validations` rule is evaluated with cel-python at its place in the
  object (`self`), transition rules with `oldSelf` on updates only; as on the server, a
  type error blocks the rules.

`structural_errors(schema)` lists why the API server would refuse a CRD's schema.
Not emulated: validation ratcheting, CEL cost limits, format checks, CEL type checking.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import celpy
import jsonschema
import re2
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError

__all__ = ["CrdValidator", "structural_errors"]

Json = Any
Schema = Mapping[str, Any]

_MISSING: Final = object()  # no correlated old value
_BLOCKED = (
    "some validation rules were not checked because the object was invalid; "
    "correct the existing errors to complete validation"
)
_SCALAR_TYPES: Final = frozenset({"string", "integer", "number", "boolean"})


@dataclass(frozen=True)
class _Error:
    path: str
    text: str
    blocking: bool = False  # a type error: the server then skips the CEL rules

    def __str__(self) -> str:
        return f"{self.path or '<nil>'}: {self.text}"


class CrdValidator:
    """Validation of objects of one version of a CRD (the storage version by default)."""

    def __init__(self, crd: Mapping[str, Any], version: str | None = None) -> None:
        versions = crd["spec"]["versions"]
        chosen = next(
            v for v in versions if (v["name"] == version if version else v.get("storage"))
        )
        # A private copy: the caller's CRD may change later; the compiled rules may not.
        self.schema: dict[str, Any] = copy.deepcopy(chosen["schema"]["openAPIV3Schema"])
        self.has_status_subresource = "status" in chosen.get("subresources", {})
        self._json_validator = _Re2Validator(_to_json_schema(self.schema))
        self._environment = celpy.Environment()
        self._programs: dict[str, celpy.Runner] = {}
        for node, _ in _schema_nodes(self.schema, ""):
            for rule in node.get("x-kubernetes-validations", []):
                for text in (rule["rule"], rule.get("messageExpression")):
                    if text is not None and text not in self._programs:
                        self._programs[text] = self._environment.program(
                            self._environment.compile(text)
                        )

    def validate(
        self,
        obj: Mapping[str, Any],
        old: Mapping[str, Any] | None = None,
        *,
        subresource: str | None = None,
    ) -> list[str]:
        """Errors for writing `obj` (over `old` on an update), in the server's words.

        With a status subresource, the main endpoint ignores `.status` (kept from `old`,
        dropped on create) and `subresource="status"` changes only `.status`: so only what
        that endpoint can change is judged.
        """
        new = self._as_written(obj, old, subresource)
        new = self.apply_defaults(self._pruned(new, unknown=False))
        before: Json = _MISSING
        if old is not None:
            before = self.apply_defaults(self._pruned(dict(old), unknown=False))
        errors = list(self._schema_errors(new))
        for node, value, _, path in _value_nodes(self.schema, new, before, ""):
            errors.extend(_unknown_fields(node, value, path))
            errors.extend(_duplicates(node, value, path))
        if any(error.blocking for error in errors):
            errors.append(_Error("", f'Invalid value: "null": {_BLOCKED}'))
        else:
            for node, value, old_value, path in _value_nodes(self.schema, new, before, ""):
                errors.extend(self._rule_errors(node, value, old_value, path))
        return list(dict.fromkeys(str(error) for error in errors))

    def apply_defaults(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of `obj` with the schema's defaults filled in where fields are absent."""
        result = copy.deepcopy(dict(obj))
        _fill_defaults(self.schema, result, "")
        return result

    def prune(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of `obj` as the server stores it: unknown fields and nulls in fields that
        are not nullable dropped (without fieldValidation=Strict)."""
        return self._pruned(copy.deepcopy(dict(obj)), unknown=True)

    # --- the steps -------------------------------------------------------------------

    def _as_written(
        self, obj: Mapping[str, Any], old: Mapping[str, Any] | None, subresource: str | None
    ) -> dict[str, Any]:
        new = copy.deepcopy(dict(obj))
        if not self.has_status_subresource:
            return new
        if subresource is None:
            new.pop("status", None)
            if old is not None and "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        elif subresource == "status":
            if old is not None:
                status = new.get("status", _MISSING)
                new = {key: copy.deepcopy(value) for key, value in old.items() if key != "status"}
                if status is not _MISSING:
                    new["status"] = status
        else:
            raise ValueError(f"no such subresource: {subresource}")
        return new

    def _pruned(self, obj: dict[str, Any], *, unknown: bool) -> dict[str, Any]:
        _prune(self.schema, obj, "", unknown=unknown)
        return obj

    def _schema_errors(self, obj: Json) -> Iterator[_Error]:
        for error in self._json_validator.iter_errors(obj):
            path = _format_path(self.schema, list(error.absolute_path))
            keyword, instance, expected = error.validator, error.instance, error.validator_value
            if keyword == "required":
                for name in expected:
                    if isinstance(instance, dict) and name not in instance:
                        yield _Error(_field(path, name), "Required value")
            elif keyword == "type":
                types = expected if isinstance(expected, list) else [expected]
                wanted = " or ".join(t for t in types if t != "null")
                yield _Error(
                    path,
                    f'Invalid value: "{_json_type(instance)}": must be of type {wanted}',
                    blocking=True,
                )
            elif keyword == "enum":
                supported = ", ".join(json.dumps(value) for value in expected)
                yield _Error(
                    path,
                    f"Unsupported value: {_shown(instance)}: supported values: {supported}",
                )
            else:
                yield _Error(path, f"Invalid value: {_shown(instance)}: {_wording(error)}")

    def _rule_errors(self, node: Schema, value: Json, old: Json, path: str) -> Iterator[_Error]:
        for rule in node.get("x-kubernetes-validations", []):
            transition = re.search(r"\boldSelf\b", rule["rule"]) is not None
            if transition and old is _MISSING:
                continue  # transition rules run on updates of values that existed before
            activation = {"self": json_to_cel(value)}
            if transition:
                activation["oldSelf"] = json_to_cel(old)
            where = path + _field_path_suffix(rule.get("fieldPath", ""))
            result = self._evaluate(rule["rule"], activation)
            is_bool = isinstance(result, bool | celtypes.BoolType)
            if is_bool and result:
                continue
            if not is_bool:
                yield _Error(
                    where, f'Invalid value: "{_schema_type(node)}": rule evaluation error: {result}'
                )
                continue
            message = rule.get("message") or f"failed rule: {rule['rule']}"
            if "messageExpression" in rule:
                custom = self._evaluate(rule["messageExpression"], activation)
                if isinstance(custom, str) and custom:  # StringType, or str from `+`
                    message = str(custom)
            yield _Error(where, _reason_text(rule.get("reason"), _schema_type(node), message))

    def _evaluate(self, text: str, activation: dict[str, Any]) -> object:
        try:
            return self._programs[text].evaluate(activation)
        except CELEvalError as error:
            return error


# --- JSON Schema ----------------------------------------------------------------------


def _re2_pattern(
    validator: Any, pattern: str, instance: Json, schema: Schema
) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and re2.search(pattern, instance) is None:
        yield jsonschema.ValidationError(f"should match '{pattern}'")


_Re2Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _re2_pattern}
)


def _to_json_schema(node: Schema) -> dict[str, Any]:
    """An OpenAPI v3.0 structural schema node as JSON Schema (2020-12)."""
    result: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            result[key] = {name: _to_json_schema(child) for name, child in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            result[key] = _to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            result[key] = [_to_json_schema(child) for child in value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            if value is True:
                result[key] = node[bound]
        elif key in ("nullable", "format", "description", "default", "example", "title"):
            continue
        elif not key.startswith("x-kubernetes-"):
            result[key] = value
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if node.get(key) is True:
            result.pop("minimum" if key == "exclusiveMinimum" else "maximum", None)
    if node.get("x-kubernetes-int-or-string"):
        result.pop("anyOf", None)
        result["type"] = ["integer", "string"]
    if node.get("nullable"):
        if "type" in result:
            types = result["type"] if isinstance(result["type"], list) else [result["type"]]
            result["type"] = [*types, "null"]
        if "enum" in result:
            result["enum"] = [*result["enum"], None]
    return result


def _wording(error: jsonschema.ValidationError) -> str:
    expected = error.validator_value
    wording: dict[str, str] = {
        "minimum": f"should be greater than or equal to {expected}",
        "maximum": f"should be less than or equal to {expected}",
        "exclusiveMinimum": f"should be greater than {expected}",
        "exclusiveMaximum": f"should be less than {expected}",
        "minLength": f"should be at least {expected} chars long",
        "maxLength": f"may not be longer than {expected}",
        "minItems": f"should have at least {expected} items",
        "maxItems": f"must have at most {expected} items",
        "minProperties": f"should have at least {expected} properties",
        "maxProperties": f"may have at most {expected} properties",
    }
    return wording.get(str(error.validator), str(error.message))


# --- walking a value along its schema -------------------------------------------------


def _value_nodes(
    schema: Schema, value: Json, old: Json, path: str
) -> Iterator[tuple[Schema, Json, Json, str]]:
    """(schema node, value, correlated old value or _MISSING, path) for every value."""
    yield schema, value, old, path
    if isinstance(value, dict):
        for key, child in value.items():
            sub, child_path = _child(schema, key, path)
            if sub is None:
                continue  # unknown, or metadata at the root (ObjectMeta: the server's own)
            old_child = old.get(key, _MISSING) if isinstance(old, dict) else _MISSING
            yield from _value_nodes(sub, child, old_child, child_path)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        keys = schema.get("x-kubernetes-list-map-keys")
        old_items: dict[str, Json] = {}
        if schema.get("x-kubernetes-list-type") == "map" and keys and isinstance(old, list):
            old_items = {_map_key(item, keys): item for item in old}
        for index, child in enumerate(value):
            old_child = old_items.get(_map_key(child, keys), _MISSING) if old_items else _MISSING
            yield from _value_nodes(schema["items"], child, old_child, f"{path}[{index}]")


def _child(schema: Schema, key: str, path: str) -> tuple[Schema | None, str]:
    """The schema of `value[key]` (None: unknown, or the root's metadata, which is the
    server's ObjectMeta) and its path."""
    if not path and key == "metadata":
        return None, key
    properties = schema.get("properties", {})
    if key in properties:
        return properties[key], _field(path, key)
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        return extra, f"{path}[{key}]"
    return None, _field(path, key)


def _unknown_fields(schema: Schema, value: Json, path: str) -> Iterator[_Error]:
    if not isinstance(value, dict) or _keeps_unknown(schema):
        return
    for key in value:
        sub, child_path = _child(schema, key, path)
        if sub is None and not _is_root_field(path, key):
            yield _Error(child_path, "Unknown field: field not declared in schema")


def _keeps_unknown(schema: Schema) -> bool:
    return bool(schema.get("x-kubernetes-preserve-unknown-fields")) or (
        "additionalProperties" in schema and schema["additionalProperties"] is not False
    )


def _duplicates(schema: Schema, value: Json, path: str) -> Iterator[_Error]:
    list_type = schema.get("x-kubernetes-list-type")
    if list_type not in ("map", "set") or not isinstance(value, list):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen: set[str] = set()
    for index, item in enumerate(value):
        key = _map_key(item, keys) if list_type == "map" else json.dumps(item, sort_keys=True)
        if key in seen:
            yield _Error(f"{path}[{index}]", f"Duplicate value: {key}")
        seen.add(key)


def _map_key(item: Json, keys: list[str] | None) -> str:
    if not isinstance(item, dict) or not keys:
        return json.dumps(item, sort_keys=True)
    return json.dumps({key: item.get(key) for key in keys}, separators=(",", ":"))


def _prune(schema: Schema, value: Json, path: str, *, unknown: bool) -> None:
    if isinstance(value, dict):
        for key in list(value):
            sub, child_path = _child(schema, key, path)
            if sub is None:
                if unknown and not _keeps_unknown(schema) and not _is_root_field(path, key):
                    del value[key]
            elif value[key] is None and not sub.get("nullable"):
                del value[key]
            else:
                _prune(sub, value[key], child_path, unknown=unknown)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            _prune(schema["items"], item, f"{path}[{index}]", unknown=unknown)


def _is_root_field(path: str, key: str) -> bool:
    return not path and key in ("apiVersion", "kind", "metadata")


def _fill_defaults(schema: Schema, value: Json, path: str) -> None:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        for key, child in value.items():
            sub, child_path = _child(schema, key, path)
            if sub is not None:
                _fill_defaults(sub, child, child_path)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            _fill_defaults(schema["items"], item, f"{path}[{index}]")


# --- paths and wording ----------------------------------------------------------------


def _field(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _format_path(schema: Schema, elements: list[str | int]) -> str:
    path, node = "", schema
    for element in elements:
        if isinstance(element, int):
            path, node = f"{path}[{element}]", node.get("items", {})
        else:
            sub, path = _child(node, element, path)
            node = sub if sub is not None else {}
    return path


def _field_path_suffix(field_path: str) -> str:
    """A rule's fieldPath (`.a.b`, `.a['x']`, `.a[0]`) in the server's error notation."""
    parts = re.findall(r"\.([A-Za-z_$][\w$-]*)|\['([^']*)'\]|\[(\d+)\]", field_path)
    suffix = ""
    for name, key, index in parts:
        suffix += f".{name}" if name else f"[{key or index}]"
    return suffix


def _reason_text(reason: str | None, kind: str, message: str) -> str:
    if reason == "FieldValueForbidden":
        return f"Forbidden: {message}"
    if reason == "FieldValueRequired":
        return f"Required value: {message}"
    if reason == "FieldValueDuplicate":
        return f"Duplicate value: {message}"
    return f'Invalid value: "{kind}": {message}'


def _schema_type(node: Schema) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "string"
    return str(node.get("type", "object"))


def _json_type(value: Json) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _shown(value: Json) -> str:
    if isinstance(value, dict | list):
        return f'"{_json_type(value)}"'
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 100 else text[:97] + '..."'


# --- structural schemas ---------------------------------------------------------------

_JUNCTORS: Final = ("anyOf", "allOf", "oneOf", "not")
_NOT_IN_JUNCTORS: Final = ("type", "description", "default", "additionalProperties", "nullable")
_FORBIDDEN: Final = (
    "$ref",
    "$schema",
    "$defs",
    "definitions",
    "dependencies",
    "patternProperties",
    "additionalItems",
    "id",
    "const",
)
_FORMATS_WORDS = (
    "int32 int64 float double byte date date-time duration password uri email hostname ipv4"
    " ipv6 cidr mac uuid binary"
)
_FORMATS: Final = frozenset(_FORMATS_WORDS.split())
_INT_OR_STRING: Final = [{"type": "integer"}, {"type": "string"}]
# apiextensions/v1 JSONSchemaProps and ValidationRule: kubernetes-validate checks these keys
# near the root only (it does not look inside `items`), so every node is checked here.
_SCHEMA_KEYS_WORDS = (
    "id $schema $ref description type format title default maximum exclusiveMaximum minimum"
    " exclusiveMinimum maxLength minLength pattern maxItems minItems uniqueItems multipleOf"
    " enum maxProperties minProperties required items allOf oneOf anyOf not properties"
    " additionalProperties patternProperties dependencies additionalItems definitions"
    " externalDocs example nullable x-kubernetes-preserve-unknown-fields"
    " x-kubernetes-embedded-resource x-kubernetes-int-or-string x-kubernetes-list-map-keys"
    " x-kubernetes-list-type x-kubernetes-map-type x-kubernetes-validations"
)
_SCHEMA_KEYS: Final = frozenset(_SCHEMA_KEYS_WORDS.split())
_RULE_KEYS: Final = frozenset(
    {"rule", "message", "messageExpression", "reason", "fieldPath", "optionalOldSelf"}
)
_REASONS: Final = frozenset(
    {"FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"}
)


def structural_errors(schema: Schema) -> list[str]:
    """Why the API server would refuse `schema` as a CRD's openAPIV3Schema; [] if it would
    not (for the rules checked: structural-schema rules, list types, defaults, CEL rules
    that compile and name existing fields)."""
    errors: list[str] = []
    if schema.get("type") != "object":
        errors.append("openAPIV3Schema.type: Required value: must be object at the root")
    metadata = schema.get("properties", {}).get("metadata")
    if metadata is not None and set(metadata) - {"type", "properties"}:
        errors.append("openAPIV3Schema.properties[metadata]: Forbidden: only type: object")
    if metadata is not None and set(metadata.get("properties", {})) - {"name", "generateName"}:
        errors.append("openAPIV3Schema.properties[metadata]: Forbidden: only name, generateName")
    environment = celpy.Environment()
    for node, path in _schema_nodes(schema, "openAPIV3Schema"):
        errors.extend(_node_errors(node, path, environment))
    return errors


def _schema_nodes(node: Schema, path: str) -> Iterator[tuple[Schema, str]]:
    """Every node of a schema outside junctors, with its path in the server's notation."""
    yield node, path
    for name, child in node.get("properties", {}).items():
        yield from _schema_nodes(child, f"{path}.properties[{name}]")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), Mapping):
            yield from _schema_nodes(node[key], f"{path}.{key}")


def _node_errors(node: Schema, path: str, environment: celpy.Environment) -> Iterator[str]:
    int_or_string = bool(node.get("x-kubernetes-int-or-string"))
    if (
        not node.get("type")
        and not int_or_string
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        yield f"{path}.type: Required value: must not be empty for specified object fields"
    if int_or_string and "type" in node:
        yield f"{path}.type: Forbidden: must be empty with x-kubernetes-int-or-string"
    for key in sorted(set(node) - _SCHEMA_KEYS):
        yield f"{path}.{key}: Forbidden: not a field of JSONSchemaProps"
    for key in _FORBIDDEN:
        if key in node:
            yield f"{path}.{key}: Forbidden: not allowed in a structural schema"
    if node.get("uniqueItems"):
        yield f"{path}.uniqueItems: Forbidden: use x-kubernetes-list-type: set"
    if "properties" in node and "additionalProperties" in node:
        yield f"{path}.additionalProperties: Forbidden: properties and additionalProperties"
    if node.get("additionalProperties") is False:
        yield f"{path}.additionalProperties: Forbidden: must not be false"
    if "format" in node and node["format"] not in _FORMATS:
        yield f"{path}.format: Unsupported value: {node['format']!r}"
    for junctor in _JUNCTORS:
        if junctor not in node:
            continue
        if junctor == "anyOf" and int_or_string and node["anyOf"] == _INT_OR_STRING:
            continue
        branches = node[junctor] if isinstance(node[junctor], list) else [node[junctor]]
        for index, branch in enumerate(branches):
            yield from _junctor_errors(node, branch, f"{path}.{junctor}[{index}]")
    yield from _list_type_errors(node, path)
    if "default" in node:
        default_errors = list(_Re2Validator(_to_json_schema(node)).iter_errors(node["default"]))
        if default_errors:
            yield f"{path}.default: Invalid value: {default_errors[0].message}"
    for index, rule in enumerate(node.get("x-kubernetes-validations", [])):
        where = f"{path}.x-kubernetes-validations[{index}]"
        for key in sorted(set(rule) - _RULE_KEYS):
            yield f"{where}.{key}: Forbidden: not a field of ValidationRule"
        if rule.get("reason", "FieldValueInvalid") not in _REASONS:
            yield f"{where}.reason: Unsupported value: {rule['reason']!r}"
        try:
            environment.compile(rule["rule"])
        except CELParseError as error:
            yield f"{where}.rule: Invalid value: compilation failed: {error}"
        field_path = rule.get("fieldPath")
        if field_path is not None and not _resolves(node, field_path):
            yield f"{where}.fieldPath: Invalid value: {field_path!r} is not a field of the node"


def _junctor_errors(outer: Schema, branch: Schema, path: str) -> Iterator[str]:
    for key in branch:
        if key in _NOT_IN_JUNCTORS or key.startswith("x-kubernetes-"):
            yield f"{path}.{key}: Forbidden: must not be used inside {path.rsplit('.', 1)[-1]}"
    for name in branch.get("properties", {}):
        if name not in outer.get("properties", {}):
            yield f"{path}.properties[{name}]: Required value: must be specified outside too"
    if "items" in branch and "items" not in outer:
        yield f"{path}.items: Required value: must be specified outside too"


def _list_type_errors(node: Schema, path: str) -> Iterator[str]:
    list_type = node.get("x-kubernetes-list-type")
    keys = node.get("x-kubernetes-list-map-keys")
    items = node.get("items", {})
    if keys is not None and list_type != "map":
        yield f"{path}.x-kubernetes-list-map-keys: Forbidden: only with list-type map"
    if list_type == "set" and items.get("type") not in _SCALAR_TYPES:
        yield f"{path}.items: Invalid value: set items must be scalars"
    if list_type != "map":
        return
    if items.get("type") != "object" or not keys:
        yield f"{path}: Invalid value: list-type map needs object items and map keys"
        return
    for key in keys:
        sub = items.get("properties", {}).get(key)
        if sub is None or sub.get("type") not in _SCALAR_TYPES or sub.get("nullable"):
            yield f"{path}.x-kubernetes-list-map-keys: Invalid value: {key!r} must be a scalar"
        elif key not in items.get("required", []) and "default" not in sub:
            yield f"{path}.x-kubernetes-list-map-keys: Invalid value: {key!r} must be required"


def _resolves(node: Schema, field_path: str) -> bool:
    if not re.fullmatch(r"(\.[A-Za-z_$][\w$-]*|\['[^']*'\]|\[\d+\])+", field_path):
        return False
    current: Schema | None = node
    for name, key, index in re.findall(
        r"\.([A-Za-z_$][\w$-]*)|\['([^']*)'\]|\[(\d+)\]", field_path
    ):
        if current is None:
            return False
        current = current.get("items") if index else current.get("properties", {}).get(name or key)
    return current is not None
