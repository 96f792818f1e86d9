"""Numbers read the way a person writes them: three significant digits, no exponent."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from einpar.units import format_bytes, format_count, format_seconds

# At most three digits before the point, an optional `×10^N` past the largest unit, a unit.
READABLE = re.compile(r"^[0-9]{1,3}(\.[0-9]+)?(×10\^[0-9]+)?( ?[A-Za-zµ]+)?$")


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_any_number_reads_without_an_exponent(value):
    for text in (format_bytes(value), format_count(value), format_seconds(value)):
        assert READABLE.match(text), text
        assert "e+" not in text and "e-" not in text


@given(st.integers(min_value=0, max_value=2**80))
def test_any_whole_number_of_bytes_reads_without_an_exponent(value):
    assert READABLE.match(format_bytes(value)), format_bytes(value)


@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "0.977 KiB"), (1024, "1.00 KiB"),
    (32 * 2**10, "32.0 KiB"), (1020 * 2**20, "0.996 GiB"), (1.02 * 2**30, "1.02 GiB"),
    (256 * 2**20, "256 MiB"), (1.5 * 2**40, "1.50 TiB"), (3 * 2**50, "3.00 PiB"),
    (2**70, "1.18×10^21 B"),
])
def test_bytes(value, text):
    assert format_bytes(value) == text


@pytest.mark.parametrize("value, text", [
    (0, "0"), (7, "7"), (999, "999"), (999.5, "1.00k"), (1000, "1.00k"), (16_384, "16.4k"),
    (1.2e9, "1.20G"), (18_709_145_976_832, "18.7T"), (2e15, "2.00P"), (1e18, "1.00E"),
    (1e21, "1.00×10^21"),
])
def test_counts(value, text):
    assert format_count(value) == text


@pytest.mark.parametrize("value, text", [
    (0, "0"), (5e-10, "0.500 ns"), (1.3e-7, "130 ns"), (1e-3, "1.00 ms"), (999.96e-6, "1.00 ms"),
    (0.0436, "43.6 ms"), (43.6, "43.6 s"), (150, "2.50 min"), (3 * 3600, "3.00 h"),
    (4 * 86400, "4.00 days"), (12 * 365.25 * 86400, "12.0 years"),
    (13041990049751244800.0, "4.13×10^11 years"),
])
def test_seconds(value, text):
    assert format_seconds(value) == text
