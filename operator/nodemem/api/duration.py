"""Go duration strings (`90s`, `1h30m`, `500ms`), as Kubernetes users write them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from pydantic import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from nodemem.api.written import WrittenValue

__all__ = ["Duration", "parse_duration", "parse_duration_ns"]

_NANOSECONDS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu; Go accepts both
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_MAX_NANOSECONDS = 2**63 - 1  # Go's time.Duration is an int64 of nanoseconds
_MAX_TEXT = 64
_TERM = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
DURATION_PATTERN = r"^([0-9]+(\.[0-9]*)?(ns|us|µs|μs|ms|s|m|h))+$"


def parse_duration_ns(text: str) -> int:
    """Nanoseconds of a Go duration such as `2h45m30.5s`; `0` alone needs no unit.

    Like Go's time.ParseDuration, but without a sign: a negative age or interval is
    always a mistake here. Fractions below a nanosecond are truncated, as in Go.
    Raises ValueError with a message fit for a user.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as 90s or 24h, found {type(text).__name__}")
    if text == "0":
        return 0
    if len(text) > _MAX_TEXT or not text:
        raise ValueError(f"invalid duration {text[:_MAX_TEXT]!r}")
    total = Decimal(0)
    position = 0
    while position < len(text):
        term = _TERM.match(text, position)
        if term is None:
            hint = " (days are not a unit: write 24h)" if text.endswith("d") else ""
            raise ValueError(
                f"invalid duration {text!r}: expected numbers with units "
                f"ns, us, ms, s, m or h, e.g. 90s or 1h30m{hint}"
            )
        total += Decimal(term[1]) * _NANOSECONDS[term[2]]
        position = term.end()
    if total > _MAX_NANOSECONDS:
        raise ValueError(f"invalid duration {text!r}: out of range")
    return int(total)


def parse_duration(text: str) -> timedelta:
    """A Go duration as a timedelta (truncated to whole microseconds)."""
    return timedelta(microseconds=parse_duration_ns(text) // 1000)


@dataclass(frozen=True)
class Duration(WrittenValue):
    """A positive Go duration (`90s`, `24h`) that serialises back to the text written."""

    delta: timedelta
    text: str

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, cls):
            return value
        if isinstance(value, bool) or not isinstance(value, str):
            shown = "an integer without a unit" if isinstance(value, int) else _kind(value)
            raise ValueError(f"expected a duration such as 90s or 24h, found {shown}")
        delta = parse_duration(value)
        if delta <= timedelta(0):
            raise ValueError(f"duration {value!r} must be at least 1us")
        return cls(delta=delta, text=value)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "pattern": DURATION_PATTERN}


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return type(value).__name__
