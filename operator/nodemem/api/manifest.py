"""NodeMemoryPolicy manifests: YAML text in, validated policies out, and back.

No I/O: callers read files or API objects and pass text or mappings. Every error
message starts with where the problem is, e.g. `spec.cleanup[1].schedule: ...`, and
all problems in a text are reported together.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .policy import API_VERSION, KIND, NodeMemoryPolicy

__all__ = [
    "MAX_MANIFEST_BYTES",
    "PolicyError",
    "decode_manifest",
    "load_policies",
    "load_policy_bytes",
    "policy_to_manifest",
    "validate_policy",
]

# etcd's default limit for one object (1.5 MiB): a larger policy could never be stored in
# a cluster, and parsing one costs seconds. Files and state are capped the same.
MAX_MANIFEST_BYTES = 3 * 512 * 1024


class PolicyError(ValueError):
    """One or more problems in policy manifests, each `"<path>: <message>"`."""

    def __init__(self, messages: Sequence[str]) -> None:
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


def decode_manifest(data: bytes) -> str:
    """A manifest file's bytes as text; PolicyError when it is too large or not UTF-8.

    YAML is UTF-8 (as kubectl reads it): a byte that is not is an error naming where it
    is, never a guess at another encoding.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise PolicyError([f"larger than {MAX_MANIFEST_BYTES} bytes (etcd's object limit)"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise PolicyError(
            [
                f"not valid UTF-8: byte 0x{data[error.start]:02x} at line {line}, "
                f"column {column} ({error.reason})"
            ]
        ) from None


def load_policy_bytes(data: bytes) -> list[NodeMemoryPolicy]:
    """`load_policies` of a file's bytes (see decode_manifest); raises PolicyError."""
    return load_policies(decode_manifest(data))


def load_policies(text: str) -> list[NodeMemoryPolicy]:
    """The policies in a YAML text of one or more documents; empty documents are skipped.

    Raises PolicyError listing every problem: YAML syntax (with its line), a key given
    twice in one mapping, documents that are not NodeMemoryPolicy v1alpha1, invalid
    fields, names used twice.
    """
    if len(text) > MAX_MANIFEST_BYTES:  # characters: at least as many bytes
        raise PolicyError([f"larger than {MAX_MANIFEST_BYTES} bytes (etcd's object limit)"])
    documents, yaml_errors = _parse_yaml(text)
    errors: list[str] = []
    several = sum(document is not None for document in documents) > 1
    policies: list[NodeMemoryPolicy] = []
    document_of_name: dict[str, int] = {}
    for number, document in enumerate(documents, start=1):
        if document is None:
            continue
        where = f"document {number}"
        header_error = _header_error(document, where)
        if header_error is not None:
            errors.append(header_error)
            continue
        assert isinstance(document, Mapping)
        where += _policy_label(document)
        try:
            policy = validate_policy(document)
        except PolicyError as error:
            errors.extend(f"{where}: {m}" if several else m for m in error.messages)
            continue
        if policy.name in document_of_name:
            errors.append(
                f"{where}: metadata.name: duplicate of document {document_of_name[policy.name]}"
            )
            continue
        document_of_name[policy.name] = number
        policies.append(policy)
    errors += yaml_errors  # the YAML error comes after every document read before it
    if errors:
        raise PolicyError(errors)
    return policies


def validate_policy(document: object) -> NodeMemoryPolicy:
    """One NodeMemoryPolicy from a parsed manifest or API object; raises PolicyError."""
    header_error = _header_error(document, None)
    if header_error is not None:
        raise PolicyError([header_error])
    try:
        return NodeMemoryPolicy.model_validate(document)
    except ValidationError as error:
        raise PolicyError(
            [f"{_path(detail['loc'])}: {_message(detail)}" for detail in error.errors()]
        ) from None


def policy_to_manifest(policy: NodeMemoryPolicy) -> dict[str, Any]:
    """A manifest that `load_policies` reads back to an equal policy.

    camelCase keys, values as the user wrote them (`512Mi` stays `512Mi`), fields left
    at their defaults omitted.
    """
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": policy.metadata.model_dump(mode="json", by_alias=True),
        "spec": policy.spec.model_dump(mode="json", by_alias=True, exclude_defaults=True),
    }


# libyaml's parser when PyYAML has it: several times faster than the pure-Python one on large
# files (bench/parsers.py).
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_BaseLoader):  # type: ignore[valid-type, misc]
    """Safe YAML that refuses a key given twice in one mapping.

    PyYAML keeps the last value silently (`size: 1Gi` ... `size: 10Gi`): the admin
    would not know which one is enforced. Merge keys (`<<`) may still be overridden.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeConstructor reports it itself
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {_describe(key)}",
                    key_node.start_mark,
                )
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _parse_yaml(text: str) -> tuple[list[object], list[str]]:
    """The documents of a YAML text and, if parsing stopped early, why."""
    documents: list[object] = []
    try:
        for document in yaml.load_all(text, Loader=_StrictLoader):  # a SafeLoader
            documents.append(document)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = "; ".join(part for part in (error.context, error.problem) if part)
        return documents, [f"document {len(documents) + 1}: YAML syntax error at {where}{reason}"]
    except yaml.YAMLError as error:
        reason = str(error).splitlines()[0]  # the rest is PyYAML's "in <unicode string>"
        return documents, [f"document {len(documents) + 1}: YAML error: {reason}"]
    except RecursionError:
        return documents, [f"document {len(documents) + 1}: YAML nested too deeply"]
    return documents, []


def _header_error(document: object, where: str | None) -> str | None:
    """Why a document is not a NodeMemoryPolicy of our version, if it is not.

    Within a file (`where` names the document) it reads `document 2: kind is "ConfigMap",
    expected NodeMemoryPolicy`; for a single object, `kind: expected ..., found ...`.
    """
    if not isinstance(document, Mapping):
        problem = f"expected a {KIND} manifest (a mapping), found {_describe(document)}"
        return problem if where is None else f"{where}: {problem}"
    for field, expected in (("kind", KIND), ("apiVersion", API_VERSION)):
        value = document.get(field)
        if value != expected:
            found = _describe(value) if field in document else "missing"
            if where is None:
                return f"{field}: expected {expected}, found {found}"
            return f"{where}: {field} is {found}, expected {expected}"
    return None


def _policy_label(document: Mapping[Any, Any]) -> str:
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return f" (policy {json.dumps(name)})" if isinstance(name, str) else ""


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _path(loc: tuple[int | str, ...]) -> str:
    """`spec.cleanup[1].schedule` from pydantic's ('spec', 'cleanup', 1, 'schedule')."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":  # pydantic's marker for "the key itself is invalid"
            continue
        elif _IDENTIFIER.fullmatch(part):
            path += f".{part}" if path else part
        else:  # a map key such as a label: matchLabels["app.kubernetes.io/name"]
            path += f"[{json.dumps(part)}]"
    return path or "(document)"


def _message(detail: ErrorDetails) -> str:
    kind = detail["type"]
    found = _describe(detail["input"])
    if kind in ("value_error", "assertion_error"):
        return str(detail.get("ctx", {}).get("error", detail["msg"]))
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, found {found}"
    if kind == "list_type":
        return f"expected a list, found {found}"
    if kind.endswith("_type") or kind == "literal_error":
        return f"{detail['msg']}, found {found}"
    return detail["msg"]


def _describe(value: object) -> str:
    """A YAML value as a user would recognise it in a message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        shown = json.dumps(value[:60])
        return shown if len(value) <= 60 else shown[:-1] + '..."'
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"
