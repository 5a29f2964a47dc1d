"""Kubernetes label and field selectors, parsed and matched as the API server does.

Test infrastructure for the API emulator (``emulator.py``); not part of the product.

Label selectors (``labelSelector=``): comma-separated requirements, each one of
``key``, ``!key``, ``key=value``, ``key==value``, ``key!=value``,
``key in (a,b)``, ``key notin (a,b)``, ``key>5``, ``key<5``. As in
``k8s.io/apimachinery/pkg/labels``: ``!=`` and ``notin`` also match objects
without the key; ``>``/``<`` need an integer value and a label that parses as one.

Field selectors (``fieldSelector=``): comma-separated ``path=value``,
``path==value`` or ``path!=value``, where the path is dotted
(``metadata.name``, ``spec.nodeName``) and ``\\`` escapes ``,``, ``=`` and ``!``
in values. Values compare as strings; a missing field is the empty string.
Which paths a resource supports is the emulator's business, not this module's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FieldRequirement",
    "FieldSelector",
    "LabelRequirement",
    "LabelSelector",
    "SelectorError",
    "label_selector_to_string",
]

_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)"
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY_RE = re.compile(rf"^({_PREFIX}/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^{_NAME}?$")
_TOKEN_RE = re.compile(r"\s*(==|!=|=|!|\(|\)|,|<|>|[^\s,()=!<>]+)")


class SelectorError(ValueError):
    """The selector does not parse; the API server answers 400 BadRequest."""


@dataclass(frozen=True)
class LabelRequirement:
    """One requirement of a label selector."""

    key: str
    operator: str  # "exists", "!exists", "=", "!=", "in", "notin", "gt", "lt"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case "exists":
                return present
            case "!exists":
                return not present
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
            case "gt" | "lt":
                if not present or value is None:
                    return False
                try:
                    number = int(value)
                except ValueError:
                    return False
                bound = int(self.values[0])
                return number > bound if self.operator == "gt" else number < bound
        raise AssertionError(f"unknown operator {self.operator!r}")  # pragma: no cover


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector; the empty selector matches everything."""

    requirements: tuple[LabelRequirement, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        if text is None or not text.strip():
            return cls()
        tokens = _tokenize(text)
        requirements: list[LabelRequirement] = []
        pos = 0
        while True:
            requirement, pos = _parse_label_requirement(tokens, pos, text)
            requirements.append(requirement)
            if pos == len(tokens):
                break
            if tokens[pos] != ",":
                raise SelectorError(f"unable to parse requirement: {text!r}: expected ','")
            pos += 1
            if pos == len(tokens):
                raise SelectorError(f"unable to parse requirement: {text!r}: trailing ','")
        return cls(tuple(requirements))

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(requirement.matches(labels) for requirement in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN_RE.match(text, pos)
        if match is None:  # pragma: no cover  # the token regex accepts any character
            raise SelectorError(f"unable to parse {text!r} at {pos}")
        tokens.append(match.group(1))
        pos = match.end()
    return tokens


def _check_key(key: str, text: str) -> str:
    name = key.rsplit("/", 1)[-1]
    if not _KEY_RE.match(key) or len(name) > 63 or len(key) - len(name) > 254:
        raise SelectorError(f"invalid label key {key!r} in {text!r}")
    return key


def _check_value(value: str, text: str) -> str:
    if not _VALUE_RE.match(value) or len(value) > 63:
        raise SelectorError(f"invalid label value {value!r} in {text!r}")
    return value


def _is_word(token: str) -> bool:
    return token not in {"==", "!=", "=", "!", "(", ")", ",", "<", ">"}


def _parse_label_requirement(
    tokens: list[str], pos: int, text: str
) -> tuple[LabelRequirement, int]:
    if pos >= len(tokens):
        raise SelectorError(f"unable to parse requirement: {text!r}: missing key")
    if tokens[pos] == "!":
        if pos + 1 >= len(tokens) or not _is_word(tokens[pos + 1]):
            raise SelectorError(f"unable to parse requirement: {text!r}: '!' needs a key")
        key = _check_key(tokens[pos + 1], text)
        return LabelRequirement(key, "!exists"), pos + 2
    if not _is_word(tokens[pos]):
        raise SelectorError(f"unable to parse requirement: {text!r}: unexpected {tokens[pos]!r}")
    key = _check_key(tokens[pos], text)
    pos += 1
    if pos == len(tokens) or tokens[pos] == ",":
        return LabelRequirement(key, "exists"), pos
    operator = tokens[pos]
    pos += 1
    if operator in {"=", "==", "!="}:
        value = ""
        if pos < len(tokens) and _is_word(tokens[pos]):
            value = tokens[pos]
            pos += 1
        op = "!=" if operator == "!=" else "="
        return LabelRequirement(key, op, (_check_value(value, text),)), pos
    if operator in {"<", ">"}:
        if pos >= len(tokens) or not re.fullmatch(r"-?\d+", tokens[pos]):
            raise SelectorError(f"unable to parse requirement: {text!r}: {operator} needs an int")
        return LabelRequirement(key, "gt" if operator == ">" else "lt", (tokens[pos],)), pos + 1
    if operator in {"in", "notin"}:
        if pos >= len(tokens) or tokens[pos] != "(":
            raise SelectorError(f"unable to parse requirement: {text!r}: {operator} needs '('")
        pos += 1
        values: list[str] = []
        expect_value = True
        while pos < len(tokens) and tokens[pos] != ")":
            token = tokens[pos]
            if token == ",":
                if expect_value:
                    values.append("")
                expect_value = True
            elif _is_word(token) and expect_value:
                values.append(_check_value(token, text))
                expect_value = False
            else:
                raise SelectorError(f"unable to parse requirement: {text!r}: unexpected {token!r}")
            pos += 1
        if pos >= len(tokens):
            raise SelectorError(f"unable to parse requirement: {text!r}: missing ')'")
        if expect_value and values:
            values.append("")
        if not values:
            raise SelectorError(f"unable to parse requirement: {text!r}: empty value set")
        return LabelRequirement(key, operator, tuple(values)), pos + 1
    raise SelectorError(f"unable to parse requirement: {text!r}: unknown operator {operator!r}")


def label_selector_to_string(selector: Mapping[str, Any] | None) -> str:
    """Render a structured LabelSelector (matchLabels/matchExpressions) as a query string."""
    if not selector:
        return ""
    parts = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = ",".join(expression.get("values") or [])
        match operator:
            case "In":
                parts.append(f"{key} in ({values})")
            case "NotIn":
                parts.append(f"{key} notin ({values})")
            case "Exists":
                parts.append(key)
            case "DoesNotExist":
                parts.append(f"!{key}")
            case _:
                raise SelectorError(f"unknown matchExpressions operator {operator!r}")
    return ",".join(parts)


@dataclass(frozen=True)
class FieldRequirement:
    """One requirement of a field selector: ``path`` ``=``/``!=`` ``value``."""

    path: str
    operator: str  # "=" or "!="
    value: str

    def matches(self, obj: Mapping[str, Any]) -> bool:
        actual = field_value(obj, self.path)
        return (actual == self.value) == (self.operator == "=")


@dataclass(frozen=True)
class FieldSelector:
    """A parsed field selector; the empty selector matches everything."""

    requirements: tuple[FieldRequirement, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> FieldSelector:
        if text is None or not text.strip():
            return cls()
        requirements = [_parse_field_requirement(part, text) for part in _split_escaped(text)]
        return cls(tuple(requirements))

    @property
    def paths(self) -> set[str]:
        return {requirement.path for requirement in self.requirements}

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all(requirement.matches(obj) for requirement in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


def _split_escaped(text: str) -> Iterable[str]:
    part: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            part.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            yield "".join(part)
            part = []
        else:
            part.append(char)
    if escaped:
        raise SelectorError(f"invalid field selector {text!r}: dangling escape")
    yield "".join(part)


def _unescape(value: str, text: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            nxt = next(chars, "")
            if nxt not in {"\\", ",", "=", "!"}:
                raise SelectorError(f"invalid field selector {text!r}: bad escape \\{nxt}")
            out.append(nxt)
        elif char in {",", "=", "!"}:
            raise SelectorError(f"invalid field selector {text!r}: unescaped {char!r}")
        else:
            out.append(char)
    return "".join(out)


def _parse_field_requirement(part: str, text: str) -> FieldRequirement:
    # As apimachinery's splitTerm: the first "!=", "==" or "=" splits path and value.
    for index in range(len(part)):
        for operator in ("!=", "==", "="):
            if part.startswith(operator, index):
                path = part[:index].strip()
                value = part[index + len(operator) :]
                if not path or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", path):
                    raise SelectorError(f"invalid field selector {text!r}: bad path {path!r}")
                op = "!=" if operator == "!=" else "="
                return FieldRequirement(path, op, _unescape(value, text))
    raise SelectorError(f"invalid field selector {text!r}: {part!r} has no operator")


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string form of a dotted field, as the API server compares it ("" when absent)."""
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return ""
        value = value[part]
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping | list):
        return ""
    return str(value)
