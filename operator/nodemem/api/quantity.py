"""Kubernetes quantities as byte counts, and percents of a total.

Each parsed value keeps the text the user wrote, so that a policy serialises back to
exactly what was applied (the agent saves and reloads its last effective policy).
"""

from __future__ import annotations

import decimal
import re
from dataclasses import dataclass
from decimal import Decimal

from pydantic import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from nodemem.api.written import WrittenValue

__all__ = [
    "MAX_BYTES",
    "Percent",
    "Quantity",
    "SizeOrPercent",
    "format_bytes",
    "parse_percent",
    "parse_quantity",
]

# Kubernetes quantities fit a signed 64-bit integer; so does every byte count the kernel takes.
MAX_BYTES = 2**63 - 1

_SUFFIX_MULTIPLIER: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}

# The grammar of k8s.io/apimachinery resource.Quantity: a signed decimal number, then a
# binary suffix, a decimal suffix or a decimal exponent ("1e3"; "1E" alone is exa).
QUANTITY_PATTERN = (
    r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+|[mkMGTPE])?$"
)
PERCENT_PATTERN = r"^([0-9]+(\.[0-9]+)?)%$"
_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<exponent>[eE][+-]?[0-9]+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE]))?"
)
_PERCENT = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)%")
_MAX_TEXT = 64  # longer "quantities" are typos or attacks, never sizes
_MAX_EXPONENT = 30

# Exact decimal arithmetic: every accepted text has at most _MAX_TEXT digits.
_EXACT = decimal.Context(prec=200, Emax=1000, Emin=-1000, traps=[decimal.Inexact])


def parse_quantity(value: str | int) -> int:
    """Bytes of a Kubernetes quantity (`512Mi`, `1G`, `1.5Gi`, `1e3`) or a plain integer.

    The result must be a whole, non-negative number of bytes no larger than `MAX_BYTES`.
    Raises ValueError with a message fit for a user.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a quantity such as 512Mi or an integer, found {_kind(value)}")
    if isinstance(value, int):
        return _checked_bytes(Decimal(value), str(value))
    text = value
    if len(text) > _MAX_TEXT:
        raise ValueError(f"invalid quantity {text[:_MAX_TEXT]!r}...: too long")
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid quantity {text!r}: expected a number with an optional suffix "
            "(Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E), e.g. 512Mi or 1G"
        )
    number = Decimal(match["number"])
    if match["exponent"] is not None:
        exponent = int(match["exponent"][1:])
        if abs(exponent) > _MAX_EXPONENT:
            raise ValueError(f"invalid quantity {text!r}: exponent out of range")
        multiplier = Decimal(10) ** exponent
    else:
        multiplier = _SUFFIX_MULTIPLIER[match["suffix"] or ""]
    return _checked_bytes(_EXACT.multiply(number, multiplier), repr(text))


def _checked_bytes(amount: Decimal, shown: str) -> int:
    if amount < 0:
        raise ValueError(f"invalid quantity {shown}: must not be negative")
    if amount != amount.to_integral_value():
        raise ValueError(f"invalid quantity {shown}: is not a whole number of bytes")
    if amount > MAX_BYTES:
        raise ValueError(f"invalid quantity {shown}: larger than {MAX_BYTES} bytes")
    return int(amount)


def parse_percent(text: str) -> Decimal:
    """The number in a percent such as `10%` or `12.5%`; it must be in (0, 100]."""
    if not isinstance(text, str):
        raise ValueError(f"expected a percent such as 80%, found {_kind(text)}")
    match = _PERCENT.fullmatch(text) if len(text) <= _MAX_TEXT else None
    if match is None:
        raise ValueError(f"invalid percent {text[:_MAX_TEXT]!r}: expected a number and %, e.g. 80%")
    number = Decimal(match["number"])
    if not 0 < number <= 100:
        raise ValueError(f"invalid percent {text!r}: must be above 0% and at most 100%")
    return number


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int) -> str:
    """A byte count for people: `512 B`, `10 MiB`, `1.5 GiB` (one decimal at most)."""
    if n < 0:
        return "-" + format_bytes(-n)
    value = float(n)
    for unit in _BINARY_UNITS:
        shown = f"{value:.1f}".removesuffix(".0") if unit != "B" else str(n)
        # Rounding may carry into the next unit ("1024.0 KiB" is shown as "1 MiB").
        if float(shown) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{shown} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _kind(value: object) -> str:
    """What a wrong-typed YAML value is, in the user's words."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"the number {value}"
    return type(value).__name__


def _int_or_string_schema(minimum: int, pattern: str) -> JsonSchemaValue:
    # The shape of Kubernetes' own int-or-string quantities in a CRD.
    return {
        "anyOf": [
            {"type": "integer", "minimum": minimum},
            {"type": "string", "pattern": pattern},
        ],
        "x-kubernetes-int-or-string": True,
    }


@dataclass(frozen=True)
class Quantity(WrittenValue):
    """A non-negative byte count written as a Kubernetes quantity (`512Mi`) or an integer."""

    bytes: int
    text: str | int  # as written; serialised back unchanged

    @classmethod
    def parse(cls, value: object) -> Quantity:
        if isinstance(value, cls):
            return value
        checked = _quantity_input(value)
        return cls(bytes=parse_quantity(checked), text=checked)

    def __str__(self) -> str:
        return str(self.text)

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return _int_or_string_schema(0, QUANTITY_PATTERN)


@dataclass(frozen=True)
class Percent(WrittenValue):
    """A percent in (0, 100] such as `80%`; `value` is the number before the `%`."""

    value: Decimal
    text: str

    @classmethod
    def parse(cls, value: object) -> Percent:
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise ValueError(f"expected a percent such as 80%, found {_kind(value)}")
        return cls(value=parse_percent(value), text=value)

    def of(self, total_bytes: int) -> int:
        """This percent of `total_bytes`, rounded up."""
        return _ceil_percent(self.value, total_bytes)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # maxLength mirrors parse_percent's limit; CEL rules compare percents, and the API
        # server's CEL cost estimate needs every string they read to be bounded.
        return {"type": "string", "pattern": PERCENT_PATTERN, "maxLength": _MAX_TEXT}


@dataclass(frozen=True)
class SizeOrPercent(WrittenValue):
    """A positive size: a byte quantity (`512Mi`) or a percent of a total (`10%`).

    Exactly one of `bytes` and `percent` is set. Never zero: for tmpfs, size 0 means
    unlimited, and a tmpfs made unlimited can never be limited again.
    """

    bytes: int | None
    percent: Decimal | None
    text: str | int

    @classmethod
    def parse(cls, value: object) -> SizeOrPercent:
        if isinstance(value, cls):
            return value
        checked = _quantity_input(value, percent_allowed=True)
        if isinstance(checked, str) and checked.endswith("%"):
            return cls(bytes=None, percent=parse_percent(checked), text=checked)
        size = parse_quantity(checked)
        if size == 0:
            raise ValueError("must be greater than 0 (size 0 would mean unlimited)")
        return cls(bytes=size, percent=None, text=checked)

    def resolve(self, total_bytes: int) -> int:
        """Bytes: the quantity itself, or the percent of `total_bytes` rounded up (never 0)."""
        if self.percent is None:
            assert self.bytes is not None
            return self.bytes
        return _ceil_percent(self.percent, total_bytes)

    def __str__(self) -> str:
        return str(self.text)

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        pattern = f"({QUANTITY_PATTERN})|({PERCENT_PATTERN})"
        return _int_or_string_schema(1, pattern)


def _quantity_input(value: object, *, percent_allowed: bool = False) -> str | int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        example = "512Mi, 10% or an integer" if percent_allowed else "512Mi or an integer"
        raise ValueError(f"expected a quantity such as {example}, found {_kind(value)}")
    return value


def _ceil_percent(percent: Decimal, total_bytes: int) -> int:
    if total_bytes <= 0:
        raise ValueError(f"cannot take a percent of {total_bytes} bytes")
    exact = _EXACT.multiply(Decimal(total_bytes), percent)
    return -(-int(exact.to_integral_value(rounding=decimal.ROUND_CEILING)) // 100)
