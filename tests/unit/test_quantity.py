"""Kubernetes quantities, percents and their byte resolution."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemem.api.quantity import (
    MAX_BYTES,
    Percent,
    Quantity,
    SizeOrPercent,
    format_bytes,
    parse_percent,
    parse_quantity,
)

KI, MI, GI = 2**10, 2**20, 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1", 1),
        ("1024", 1024),
        ("+5", 5),
        ("1k", 1000),
        ("512Mi", 512 * MI),
        ("1G", 10**9),
        ("1Gi", GI),
        ("1.5Gi", GI + GI // 2),
        ("0.5Ki", 512),
        (".5Ki", 512),
        ("2.Ki", 2048),
        ("1T", 10**12),
        ("1Ti", 2**40),
        ("1P", 10**15),
        ("1Pi", 2**50),
        ("1E", 10**18),
        ("1Ei", 2**60),
        ("1e3", 1000),
        ("1E3", 1000),
        ("1.5e3", 1500),
        ("20e-1", 2),
        ("1000m", 1),
        ("2000m", 2),
        (1048576, MI),
        (0, 0),
    ],
)
def test_valid_quantities(text: str | int, expected: int) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "invalid quantity"),
        ("abc", "invalid quantity"),
        ("1 Gi", "invalid quantity"),
        ("1GB", "invalid quantity"),
        ("1gi", "invalid quantity"),
        ("1KiB", "invalid quantity"),
        ("Gi", "invalid quantity"),
        ("1e", "invalid quantity"),
        ("1.2.3", "invalid quantity"),
        ("-1Gi", "must not be negative"),
        ("-1", "must not be negative"),
        (-5, "must not be negative"),
        ("1.5", "whole number of bytes"),
        ("15e-1", "whole number of bytes"),
        ("1m", "whole number of bytes"),
        ("1e-1", "whole number of bytes"),
        ("0.1Ki", "whole number of bytes"),
        ("16Ei", "larger than"),
        (2**63, "larger than"),
        ("1e999", "exponent out of range"),
        ("9" * 100, "too long"),
        (1.5, "found the number 1.5"),
        (True, "found a boolean"),
        (None, "found null"),
        ([1], "found a list"),
        ({"a": 1}, "found a mapping"),
        ("10%", "invalid quantity"),
    ],
)
def test_invalid_quantities(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_quantity(value)  # type: ignore[arg-type]


def test_largest_quantity() -> None:
    assert parse_quantity(str(MAX_BYTES)) == MAX_BYTES
    assert parse_quantity("7Ei") == 7 * 2**60


@given(st.integers(min_value=0, max_value=MAX_BYTES))
def test_integers_and_their_text_agree(n: int) -> None:
    assert parse_quantity(n) == parse_quantity(str(n)) == n


@given(
    st.integers(min_value=0, max_value=2**20),
    st.sampled_from(["Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T"]),
)
def test_suffixes_multiply(n: int, suffix: str) -> None:
    multiplier = {"Ki": KI, "Mi": MI, "Gi": GI, "Ti": 2**40, "k": 10**3, "M": 10**6}
    multiplier |= {"G": 10**9, "T": 10**12}
    assert parse_quantity(f"{n}{suffix}") == n * multiplier[suffix]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10%", 10), ("100%", 100), ("12.5%", Decimal("12.5")), ("0.01%", Decimal("0.01"))],
)
def test_valid_percents(text: str, expected: Decimal) -> None:
    assert parse_percent(text) == expected


@pytest.mark.parametrize(
    "text", ["0%", "0.0%", "100.5%", "101%", "-5%", "10", "%", "10 %", ".5%", "5.%", "1e1%"]
)
def test_invalid_percents(text: str) -> None:
    with pytest.raises(ValueError, match="percent"):
        parse_percent(text)


def test_size_or_percent_keeps_what_was_written() -> None:
    size = SizeOrPercent.parse("512Mi")
    assert (size.bytes, size.percent, size.text) == (512 * MI, None, "512Mi")
    assert SizeOrPercent.parse(4096).text == 4096
    share = SizeOrPercent.parse("12.5%")
    assert (share.bytes, share.percent, share.text) == (None, Decimal("12.5"), "12.5%")
    assert str(share) == "12.5%"


def test_size_or_percent_resolves_against_a_total() -> None:
    assert SizeOrPercent.parse("512Mi").resolve(GI) == 512 * MI
    assert SizeOrPercent.parse("10%").resolve(1000) == 100
    assert SizeOrPercent.parse("50%").resolve(16 * GI) == 8 * GI
    # Rounded up, so a positive percent of a positive total is never 0 (unlimited tmpfs).
    assert SizeOrPercent.parse("0.001%").resolve(1) == 1
    assert SizeOrPercent.parse("33%").resolve(10) == 4
    with pytest.raises(ValueError, match="percent of 0 bytes"):
        SizeOrPercent.parse("10%").resolve(0)


@given(
    st.decimals(min_value=Decimal("0.001"), max_value=100, places=3),
    st.integers(min_value=1, max_value=2**50),
)
def test_percent_resolution_is_positive_and_bounded(percent: Decimal, total: int) -> None:
    resolved = SizeOrPercent.parse(f"{percent}%").resolve(total)
    assert 1 <= resolved <= total
    assert resolved * 100 >= total * percent > (resolved - 1) * 100


@pytest.mark.parametrize("value", [0, "0", "0Gi", "0%", True, 1.0, "", None])
def test_size_or_percent_rejects_zero_and_wrong_types(value: object) -> None:
    with pytest.raises(ValueError):
        SizeOrPercent.parse(value)


def test_quantity_and_percent_types() -> None:
    assert Quantity.parse("64Mi") == Quantity(bytes=64 * MI, text="64Mi")
    assert Quantity.parse(0).bytes == 0  # headroom 0 is meaningful: apply exactly what is used
    assert Percent.parse("80%").of(1000) == 800
    with pytest.raises(ValueError, match="expected a percent"):
        Percent.parse(80)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (10 * MI, "10 MiB"),
        (GI + GI // 2, "1.5 GiB"),
        (MI - 1, "1 MiB"),  # 1023.999 KiB rounds to 1024.0 KiB: shown as the next unit
        (2**60, "1 EiB"),
        (MAX_BYTES, "8 EiB"),
        (-2048, "-2 KiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
