"""Numbers as a person writes them: bytes, counts and seconds in their largest unit.

Three significant digits and never an exponent (`1.02 GiB`, `20.9T`, `1.00 ms`):
a value moves to the next unit once it would print as 1000 or more of the
current one, so no number has more than three digits before its point. Past
the largest unit the value is written in powers of ten: `1.18×10^21 B`,
`1.00×10^21` FLOPs, `4.13×10^11 years`.
Whole bytes and whole counts below 1000 print as integers (`512 B`, `999`).
"""

from __future__ import annotations

import math

BYTE_UNITS = (("B", 1), ("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40),
              ("PiB", 2**50), ("EiB", 2**60))
COUNT_UNITS = (("", 1), ("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12), ("P", 1e15), ("E", 1e18))
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
YEAR = 365.25 * DAY  # the Julian year
# Below one second, in steps of 1000; above, the units a person reads a long time in.
SECOND_UNITS = (("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0), ("min", MINUTE),
                ("h", HOUR), ("days", DAY), ("years", YEAR))
# Where each unit of time gives way to the next, in that unit (1000 below the second).
_SECOND_LIMITS = {"ns": 1000, "µs": 1000, "ms": 1000, "s": 60, "min": 60, "h": 24, "days": 365.25,
                  "years": 1000}


def significant(value: float, digits: int = 3) -> str:
    """`value` (0 <= value < 10**digits once rounded) with `digits` significant digits and no
    exponent: 1.00, 12.3, 123, 0.500; values below 10**-digits print as 0.00."""
    if value == 0:
        return "0" if digits <= 1 else "0." + "0" * (digits - 1)
    places = max(0, digits - 1 - math.floor(math.log10(value)))
    text = f"{value:.{min(places, digits)}f}"
    # Rounding may add a digit (9.996 -> 10.00): drop the decimal it made too many.
    whole, _, fraction = text.partition(".")
    keep = max(0, digits - len(whole.lstrip("0") or ""))
    if fraction and len(fraction) > keep and whole.lstrip("0"):
        text = f"{value:.{keep}f}"
    return text


def _rounds_below(value: float, limit: float) -> bool:
    """Whether `value` still prints below `limit` at three significant digits."""
    return float(significant(value)) < limit


def _scientific(value: float, unit: str) -> str:
    exponent = math.floor(math.log10(value))
    mantissa = value / 10.0 ** exponent
    if float(significant(mantissa)) >= 10:  # 9.999 rounds to 10.0: one more power of ten
        exponent, mantissa = exponent + 1, mantissa / 10
    return f"{significant(mantissa)}×10^{exponent}{unit}"


def _scaled(value: float, units, limits, whole_base: bool, space: str, overflow) -> str:
    """`value` in the first of `units` it prints below `limits(unit)` in; past the last, in
    powers of ten of the `overflow` (unit, scale)."""
    if not math.isfinite(value) or value < 0:
        return f"{value}{space}{units[0][0]}".rstrip()
    for number, (unit, scale) in enumerate(units):
        scaled = value / scale
        if not math.isfinite(scaled):  # a huge value over a tiny unit: try the next
            continue
        if number == 0 and whole_base and scaled == round(scaled) and scaled < 1000:
            return f"{int(scaled)}{space}{unit}".rstrip()
        if _rounds_below(scaled, limits(unit)):
            return f"{significant(scaled)}{space}{unit}".rstrip()
    unit, scale = overflow
    return _scientific(value / scale, (space + unit).rstrip())


def format_bytes(n: float) -> str:
    """`512 B`, `32.0 KiB`, `1.02 GiB`: powers of 1024, moving up at 1000 of a unit."""
    if 0 <= n < 1000 and math.isfinite(n):
        n = round(n)  # bytes come whole
    return _scaled(n, BYTE_UNITS, lambda unit: 1000, True, " ", BYTE_UNITS[0])


def format_count(n: float) -> str:
    """FLOPs and the like: `999`, `1.20G`, `20.9T`."""
    return _scaled(n, COUNT_UNITS, lambda unit: 1000, True, "", COUNT_UNITS[0])


def format_seconds(seconds: float) -> str:
    """`0`, `130 ns`, `1.00 ms`, `43.6 s`, `2.50 min`, `3.00 h`, `4.00 days`, `12.0 years`."""
    if seconds == 0:
        return "0"
    return _scaled(seconds, SECOND_UNITS, _SECOND_LIMITS.__getitem__, False, " ", SECOND_UNITS[-1])
