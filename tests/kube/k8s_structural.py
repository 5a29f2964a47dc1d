"""Pruning and defaulting of custom resources by their CRD's structural schema.

Test infrastructure for the API emulator (``emulator.py``); not part of the product.

What the API server does to a custom resource before validating and storing it:

1. **Pruning**: fields that the schema does not declare are dropped silently,
   unless the node says ``x-kubernetes-preserve-unknown-fields: true``; maps
   (``additionalProperties``) keep their keys; ``x-kubernetes-embedded-resource``
   keeps ``apiVersion``, ``kind`` and ``metadata``. At the root, ``apiVersion``,
   ``kind`` and ``metadata`` are always kept (metadata is the server's business).
2. **Null pruning**: a ``null`` for a field that is not ``nullable: true`` and
   has a default is dropped, so that the default applies.
3. **Defaulting**: a missing property with a ``default`` gets a copy of it, from
   the outside in, then defaults inside the defaulted value apply too.

Validation (OpenAPI + CEL) is not here: see ``crd_schema.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = ["apply_defaults", "prune", "prune_and_default", "unknown_fields", "version_schema"]

_ROOT_KEYS = frozenset({"apiVersion", "kind", "metadata"})


def version_schema(crd: Mapping[str, Any], version: str) -> dict[str, Any] | None:
    """The openAPIV3Schema of one version of a CRD (or the legacy top-level one)."""
    for item in crd.get("spec", {}).get("versions", []):
        if item.get("name") == version:
            schema = (item.get("schema") or {}).get("openAPIV3Schema")
            if schema is not None:
                return dict(schema)
    legacy = (crd.get("spec", {}).get("validation") or {}).get("openAPIV3Schema")
    return dict(legacy) if legacy is not None else None


def prune(schema: Mapping[str, Any], obj: Any, *, root: bool = True) -> Any:
    """Drop unknown fields in place (and return the object)."""
    if isinstance(obj, dict):
        properties: Mapping[str, Any] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        embedded = bool(schema.get("x-kubernetes-embedded-resource"))
        for key in list(obj):
            if (root or embedded) and key in _ROOT_KEYS:
                continue  # ObjectMeta and type metadata are the server's, never pruned
            if key in properties:
                prune(properties[key], obj[key], root=False)
            elif isinstance(additional, Mapping):
                prune(additional, obj[key], root=False)
            elif not preserve and additional is not True:
                del obj[key]
    elif isinstance(obj, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for item in obj:
                prune(items, item, root=False)
    return obj


def apply_defaults(schema: Mapping[str, Any], obj: Any, *, root: bool = True) -> Any:
    """Apply the schema's defaults in place (and return the object)."""
    if isinstance(obj, dict):
        properties: Mapping[str, Any] = schema.get("properties") or {}
        embedded = bool(schema.get("x-kubernetes-embedded-resource"))
        for key, sub in properties.items():
            if (root or embedded) and key in _ROOT_KEYS:
                continue
            if key in obj and obj[key] is None and "default" in sub and not sub.get("nullable"):
                del obj[key]
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                apply_defaults(sub, obj[key], root=False)
        additional = schema.get("additionalProperties")
        if isinstance(additional, Mapping):
            for key in obj:
                if key not in properties:
                    apply_defaults(additional, obj[key], root=False)
    elif isinstance(obj, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for item in obj:
                apply_defaults(items, item, root=False)
    return obj


def prune_and_default(schema: Mapping[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """Both steps, in the API server's order, in place."""
    prune(schema, obj)
    apply_defaults(schema, obj)
    return obj


def unknown_fields(schema: Mapping[str, Any], obj: Any, path: str = "") -> list[str]:
    """Dotted paths of the fields pruning would drop (``fieldValidation=Strict`` refuses them)."""
    found: list[str] = []
    root = path == ""
    if isinstance(obj, dict):
        properties: Mapping[str, Any] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        embedded = bool(schema.get("x-kubernetes-embedded-resource"))
        for key, value in obj.items():
            child = f"{path}.{key}" if path else key
            if (root or embedded) and key in _ROOT_KEYS:
                continue
            if key in properties:
                found.extend(unknown_fields(properties[key], value, child))
            elif isinstance(additional, Mapping):
                found.extend(unknown_fields(additional, value, child))
            elif not preserve and additional is not True:
                found.append(child)
    elif isinstance(obj, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for index, item in enumerate(obj):
                found.extend(unknown_fields(items, item, f"{path}[{index}]"))
    return found
