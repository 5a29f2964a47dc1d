"""PATCH bodies as the API server applies them: JSON merge, strategic merge (lite), JSON patch.

Test infrastructure for the API emulator (``emulator.py``); not part of the product.

- ``application/merge-patch+json`` (RFC 7386): dicts merge recursively, ``null``
  removes a key, anything else (lists included) replaces.
- ``application/strategic-merge-patch+json``: the merge patch above, plus what the
  objects nodemem touches need: lists of dicts under the well-known field names
  in ``MERGE_KEYS`` merge item by item on their key (``conditions`` by ``type``,
  ``containers`` by ``name``, ...), ``finalizers`` merge as a set, and the
  ``$patch: replace|delete`` and ``$deleteFromPrimitiveList/<field>`` directives
  work. It knows field names, not the Go types, so a same-named list elsewhere
  merges the same way; other directives (``$setElementOrder``, ``$retainKeys``)
  are dropped. The API server refuses it for custom resources (415); the
  emulator does the same.
- ``application/json-patch+json`` (RFC 6902): add, remove, replace, move, copy,
  test; a failed ``test`` or a missing path raises :class:`PatchError` (422).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MERGE_KEYS",
    "PRIMITIVE_MERGE_LISTS",
    "PatchError",
    "apply_json_patch",
    "apply_merge_patch",
    "apply_strategic_merge_patch",
    "json_equal",
]

MERGE_KEYS: dict[str, str] = {
    "conditions": "type",
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "addresses": "type",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
}
PRIMITIVE_MERGE_LISTS: frozenset[str] = frozenset({"finalizers"})


class PatchError(ValueError):
    """The patch cannot be applied to the object; the API server answers 422."""


class PatchFormatError(PatchError):
    """The patch body itself is malformed; the API server answers 400."""


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value, the inputs are not modified."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result: dict[str, Any] = dict(copy.deepcopy(target)) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def apply_strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A strategic merge patch limited to the well-known merge keys (see the module doc)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    result: dict[str, Any] = dict(copy.deepcopy(target)) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list) and isinstance(value, list):
                result[field] = [item for item in result[field] if item not in value]
            continue
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in MERGE_KEYS:
            result[key] = _merge_keyed_list(result.get(key), value, MERGE_KEYS[key])
        elif isinstance(value, list) and key in PRIMITIVE_MERGE_LISTS:
            current = result.get(key) if isinstance(result.get(key), list) else []
            result[key] = list(current or []) + [v for v in value if v not in (current or [])]
        else:
            merged = apply_strategic_merge_patch(result.get(key), value)
            if merged is None and isinstance(value, Mapping):
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _merge_keyed_list(current: Any, patch: list[Any], merge_key: str) -> list[Any]:
    if not all(isinstance(item, Mapping) and merge_key in item for item in patch):
        return copy.deepcopy(patch)
    if any(isinstance(item, Mapping) and item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(item) for item in patch if item.get("$patch") != "replace"]
    result: list[Any] = copy.deepcopy(current) if isinstance(current, list) else []
    for item in patch:
        index = next(
            (
                i
                for i, existing in enumerate(result)
                if isinstance(existing, Mapping) and existing.get(merge_key) == item[merge_key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append({k: copy.deepcopy(v) for k, v in item.items() if not k.startswith("$")})
        else:
            result[index] = apply_strategic_merge_patch(result[index], item)
    return result


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: unlike Python's ``==``, ``true`` is not ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str):
        raise PatchFormatError(f"JSON pointer must be a string, got {path!r}")
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchFormatError(f"JSON pointer must start with '/': {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _list_index(container: list[Any], token: str, path: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"invalid array index {token!r} in {path!r}")
    index = int(token)
    limit = len(container) if for_add else len(container) - 1
    if index > limit:
        raise PatchError(f"array index {index} out of range in {path!r}")
    return index


def _resolve(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for token in parts:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"path {path!r} does not exist: missing key {token!r}")
            node = node[token]
        elif isinstance(node, list):
            node = node[_list_index(node, token, path, for_add=False)]
        else:
            raise PatchError(f"path {path!r} does not exist: {token!r} is not in a container")
    return node


def _add(doc: Any, parts: list[str], value: Any, path: str) -> Any:
    if not parts:
        return value
    parent = _resolve(doc, parts[:-1], path)
    token = parts[-1]
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        parent.insert(_list_index(parent, token, path, for_add=True), value)
    else:
        raise PatchError(f"cannot add at {path!r}: the parent is not a container")
    return doc


def _remove(doc: Any, parts: list[str], path: str) -> tuple[Any, Any]:
    if not parts:
        raise PatchError("cannot remove the whole document")
    parent = _resolve(doc, parts[:-1], path)
    token = parts[-1]
    if isinstance(parent, dict):
        if token not in parent:
            raise PatchError(f"unable to remove nonexistent key {token!r} at {path!r}")
        return doc, parent.pop(token)
    if isinstance(parent, list):
        return doc, parent.pop(_list_index(parent, token, path, for_add=False))
    raise PatchError(f"cannot remove at {path!r}: the parent is not a container")


def apply_json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch; returns a new document, the input is not modified."""
    if not isinstance(operations, list):
        raise PatchFormatError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for operation in operations:
        if not isinstance(operation, Mapping) or "op" not in operation:
            raise PatchFormatError(f"malformed JSON patch operation: {operation!r}")
        op = operation["op"]
        path = operation.get("path")
        parts = _pointer(path)
        if op in {"add", "replace", "test"} and "value" not in operation:
            raise PatchFormatError(f"JSON patch operation {op!r} needs a value")
        match op:
            case "add":
                doc = _add(doc, parts, copy.deepcopy(operation["value"]), str(path))
            case "remove":
                doc, _ = _remove(doc, parts, str(path))
            case "replace":
                if not parts:
                    doc = copy.deepcopy(operation["value"])
                else:
                    doc, _ = _remove(doc, parts, str(path))
                    doc = _add(doc, parts, copy.deepcopy(operation["value"]), str(path))
            case "move" | "copy":
                source = _pointer(operation.get("from"))
                if op == "move" and parts[: len(source)] == source and parts != source:
                    raise PatchError(f"cannot move {operation.get('from')!r} into itself")
                if op == "move":
                    doc, value = _remove(doc, source, str(operation.get("from")))
                else:
                    value = copy.deepcopy(_resolve(doc, source, str(operation.get("from"))))
                doc = _add(doc, parts, value, str(path))
            case "test":
                actual = _resolve(doc, parts, str(path))
                if not json_equal(actual, operation["value"]):
                    raise PatchError(
                        f"testing value {path} failed: expected {operation['value']!r}, "
                        f"found {actual!r}"
                    )
            case _:
                raise PatchFormatError(f"unknown JSON patch operation {op!r}")
    return doc
